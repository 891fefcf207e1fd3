"""The one module of `trainables` that knows Ray: the training loop as a Tune function trainable.

Every epoch reports all three objectives (Tune rejects a result that lacks a searcher metric) and
a checkpoint; the final report carries the full test evaluation and the quantized model. It uses
`ray.tune.*` only: `ray.train.*` inside a Tune function is an error since Ray 2.51.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from .config import TrainConfig
from .loop import Hooks, train

CHECKPOINT_FILE = "state.pt"
MODEL_FILE = "model.pt"


class TuneHooks(Hooks):
    def load_checkpoint(self) -> dict[str, Any] | None:
        ck = tune.get_checkpoint()
        if ck is None:
            return None
        with ck.as_directory() as d:
            return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any], final: bool) -> None:
        model = checkpoint.pop("quantized_model", None)
        with tempfile.TemporaryDirectory() as d:
            torch.save(checkpoint, Path(d) / CHECKPOINT_FILE)
            if model is not None:
                torch.save(model, Path(d) / MODEL_FILE)
            tune.report(dict(metrics, final=final), checkpoint=tune.Checkpoint.from_directory(d))


def trainable(config: dict[str, Any]) -> None:
    """Ray Tune entry point: `config` holds flat TrainConfig keys (sampled and pinned)."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # the driver logs to MLflow; trials never do
    # the search space's `<name>_on` switches (0 allowed on a log scale) are not config keys
    cfg = TrainConfig.from_flat({k: v for k, v in config.items() if not (k.endswith("_on") and k[:-3] in config)})
    if cfg.device == "auto" and not tune.get_context().get_trial_resources().required_resources.get("GPU"):
        cfg.device = "cpu"  # a CPU-only trial must not grab a GPU it was not given
    torch.set_num_threads(max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1))))
    train(cfg, TuneHooks())
