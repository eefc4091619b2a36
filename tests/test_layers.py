"""Imports go downward only: receraser_core never imports Dagster or MLflow."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import receraser_core


def test_core_imports_neither_dagster_nor_mlflow() -> None:
    modules = [m.name for m in pkgutil.walk_packages(receraser_core.__path__, "receraser_core.")]
    assert len(modules) >= 5
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "outer = ('dagster', 'mlflow', 'pipelines', 'dagster_project')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in outer)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"receraser_core pulled in: {out}"
