"""The one shard partitions definition every partitioned asset shares."""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

from dagster_project.settings import load_pipeline_config

PIPELINE = load_pipeline_config()
shard_partitions = StaticPartitionsDefinition([str(k) for k in range(PIPELINE.n_shards)])
