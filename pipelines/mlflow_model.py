"""The registered RecEraser model as an MLflow pyfunc, logged as code (`pipelines.registry`).

Input: a table with a ``user`` column (original user ids) and optionally ``n`` (default 20). Output, per row,
the top-n original item ids, the user's training items masked; an unknown user gets an empty list. The same
ranking as `receraser recommend` (both use `pipelines.steps.top_items`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from pipelines.steps import load_serving_file, top_items


class RecEraserModel(PythonModel):
    # no type-hint validation, and predict untyped: MLflow warns at every model build whether predict has hints
    # (a table is not a hint it supports) or not; the input is checked in predict itself
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        agg, self.train = load_serving_file(Path(context.artifacts["serving"]))
        with np.load(context.artifacts["ids"], allow_pickle=False) as z:
            self.user_ids, self.item_ids = z["user_ids"], z["item_ids"]
        self.index = {str(u): i for i, u in enumerate(self.user_ids)}
        self.score = agg.scorer()

    def predict(self, context, model_input, params=None):
        users = [str(u) for u in model_input["user"]]
        ns = [int(n) for n in model_input["n"]] if "n" in model_input else [20] * len(users)
        out = []
        with torch.no_grad():
            for user, n in zip(users, ns, strict=True):
                u = self.index.get(user)
                top = [] if u is None else top_items(self.score, self.train, u, n)[0]
                out.append([str(self.item_ids[i]) for i in top])
        return out


mlflow.models.set_model(RecEraserModel())
