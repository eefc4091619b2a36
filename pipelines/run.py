"""Small helpers shared by the command line's jobs."""

from __future__ import annotations

from receraser_core.metrics import DEFAULT_KS


def format_metrics(metrics: dict[str, float], ks: tuple[int, ...] = DEFAULT_KS) -> str:
    """A small table: one row per cut-off with Recall and NDCG."""
    lines = ["   N   Recall@N   NDCG@N"]
    lines += [f"{k:>4}   {metrics[f'recall@{k}']:.4f}     {metrics[f'ndcg@{k}']:.4f}" for k in ks]
    return "\n".join(lines)
