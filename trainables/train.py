"""`python -m trainables.train`: one adversarial Binary-Relax training run from the terminal.

Progress goes to stdout one line per epoch; the last stdout line is a JSON object with the final
metrics. A checkpoint is written under --out after every epoch, and --resume continues from it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cliutil import OneLineParser, fail
from .config import ConfigError, TrainConfig, set_field
from .device import check_device, check_precision, pick_device
from .fileio import atomic_torch_save, atomic_write_text
from .loop import FINAL_KEYS, DivergedError, Hooks, train

# flag -> config key; flags are --kebab-case of the key
FLAGS: dict[str, tuple[str, type]] = {
    "dataset": ("dataset", str), "data-root": ("data_root", str),
    "subset-train": ("subset_train", int), "subset-test": ("subset_test", int),
    "val-fraction": ("val_fraction", float), "epochs": ("epochs", int),
    "batch-size": ("batch_size", int), "lr": ("lr", float), "momentum": ("momentum", float),
    "weight-decay": ("weight_decay", float), "bits": ("bits", int),
    "ternary-mode": ("ternary_mode", str), "lloyd-iters": ("lloyd_iters", int),
    "lambda0": ("lambda0", float), "lambda-final": ("lambda_final", float),
    "lambda-schedule": ("lambda_schedule", str), "rho": ("rho", float), "phase2-start": ("phase2_start", float),
    "ensemble": ("ensemble", int), "noise": ("noise", float), "depth": ("depth", int),
    "width": ("width", int), "loss": ("loss", str), "alpha": ("alpha", float),
    "beta": ("beta", float), "group-lasso": ("group_lasso", float),
    "group-axis": ("group_axis", str), "group-mode": ("group_mode", str),
    "attack": ("train_attack.kind", str), "eps": ("eps", float),
    "attack-step": ("attack_step", float), "attack-steps": ("attack_steps", int),
    "eval-attack": ("eval_attack.kind", str), "eval-steps": ("eval_attack.steps", int),
    "eval-eps": ("eval_eps", float), "eval-step": ("eval_step", float),
    "attack-bn": ("attack_bn", str), "proxy-bn-batches": ("proxy_bn_batches", int),
    "seed": ("seed", int), "device": ("device", str), "precision": ("precision", str),
    "eval-batch-size": ("eval_batch_size", int),
}
SWITCHES = {"download": "download", "quantize-shortcut": "quantize_shortcut",
            "quantize-fc": "quantize_fc", "no-cw": "cw", "channels-last": "channels_last",
            "compile": "compile", "deterministic": "deterministic"}
# keys that may differ between a run and its resumption
RESUMABLE_CHANGES = {"data_root", "device", "download", "compile", "channels_last", "deterministic"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainables.train", description=__doc__,
                      argument_default=argparse.SUPPRESS)
    for flag, (key, typ) in FLAGS.items():
        p.add_argument(f"--{flag}", dest=key, type=typ, metavar=typ.__name__.upper())
    for flag, key in SWITCHES.items():
        p.add_argument(f"--{flag}", dest=key, action="store_const",
                       const=not flag.startswith("no-"))
    p.add_argument("--out", default="runs/train", help="directory for checkpoint.pt, model.pt, metrics.json")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out from its last checkpoint")
    return p


class FileHooks(Hooks):
    """Checkpoint to OUT/checkpoint.pt each epoch; the final quantized model to OUT/model.pt."""

    def __init__(self, out: Path, state: dict[str, Any] | None) -> None:
        self.out, self.state = out, state

    def load_checkpoint(self) -> dict[str, Any] | None:
        return self.state

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any], final: bool) -> None:
        model = checkpoint.pop("quantized_model", None)
        atomic_torch_save(checkpoint, self.out / "checkpoint.pt")
        if final:
            atomic_torch_save(model, self.out / "model.pt")
            atomic_write_text(json.dumps(metrics, indent=2) + "\n", self.out / "metrics.json")


def config_from_args(ns: argparse.Namespace, stored: dict[str, Any] | None) -> TrainConfig:
    given = {k: v for k, v in vars(ns).items() if k not in ("out", "resume")}
    cfg = TrainConfig.from_flat(stored) if stored else TrainConfig()
    before = cfg.to_flat()
    for key, value in given.items():
        set_field(cfg, key, value)
    if stored:
        changed = [k for k, v in cfg.to_flat().items() if before[k] != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(
                f"--resume with different settings ({', '.join(changed)}); accepted: the run's own "
                f"settings (omit those flags) or a new --out"
            )
    cfg.validate()
    check_device(cfg.device)  # cuda on a machine without one, cuda:N out of range: exit 2 here
    check_precision(cfg.precision, pick_device(cfg.device))
    return cfg


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    out = Path(ns.out)
    stored_state = None
    if ns.resume:
        ck = out / "checkpoint.pt"
        if not ck.exists():
            fail(f"--resume: no checkpoint at {ck}; accepted: the --out of an earlier run")
        import torch

        stored_state = torch.load(ck, map_location="cpu", weights_only=False)
    try:
        cfg = config_from_args(ns, stored_state["config"] if stored_state else None)
        if not ns.resume:
            # reject bad data before creating anything under --out
            from .data import load_data

            data = load_data(cfg)
        else:
            data = None
    except ConfigError as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    try:
        metrics = train(cfg, FileHooks(out, stored_state), log=lambda s: print(s, flush=True), data=data)
    except ConfigError as e:
        fail(str(e))
    except DivergedError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    final = {k: metrics[k] for k in FINAL_KEYS}
    final.update({k: metrics[k] for k in ("test_cw_acc",) if k in metrics})
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
