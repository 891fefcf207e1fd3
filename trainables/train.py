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
from .contract import MODEL_FILE, RUN_CHECKPOINT_FILE, RUN_METRICS_FILE
from .device import check_device, check_precision, pick_device
from .fileio import atomic_torch_save, atomic_write_text
from .loop import FINAL_KEYS, LATENCY_KEYS, DivergedError, Hooks, train

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
    "eval-draws": ("eval_draws", int),
    "latency": ("latency", str), "latency-threads": ("latency_threads", int), "latency-runs": ("latency_runs", int),
}
SWITCHES = {"download": "download", "quantize-shortcut": "quantize_shortcut",
            "quantize-fc": "quantize_fc", "no-cw": "cw", "channels-last": "channels_last",
            "compile": "compile", "deterministic": "deterministic"}
# help for the throughput options (docs/gpu.md; CPU figures in docs/benchmarks.md)
HELP = {
    "eval-draws": "noise draws each image of the final evaluation is scored over (expected correctness, "
                  "default 20; the per-epoch proxies use 1)",
    "latency": "when to time the exported ONNX model in onnxruntime (latency_ms): end (default: the final report), every (epoch), off",
    "precision": "fp32 (default), bf16 or fp16: autocast of the model's passes; the BR projections, "
                 "penalty and attack steps stay fp32. Meant for GPUs; on a CPU with AVX512-BF16 bf16 measured "
                 "1.5x faster on CIFAR-10 images, no gain on 8x8 digits; unmeasured on CPUs without it "
                 "(docs/benchmarks.md)",
    "compile": "torch.compile the model for the training and evaluation passes. Meant for GPUs "
               "(unmeasured there); on a CPU it compiles for minutes before the first step, needs a "
               "C++ compiler, and is not recommended (figures: docs/benchmarks.md)",
    "channels-last": "NHWC weights and batches: for recent GPUs; slower on a CPU (0.84-0.96x, docs/benchmarks.md)",
}
# keys that may differ between a run and its resumption
RESUMABLE_CHANGES = {"data_root", "device", "download", "compile", "channels_last", "deterministic"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainables.train", description=__doc__,
                      argument_default=argparse.SUPPRESS)
    for flag, (key, typ) in FLAGS.items():
        p.add_argument(f"--{flag}", dest=key, type=typ, metavar=typ.__name__.upper(), help=HELP.get(flag))
    for flag, key in SWITCHES.items():
        p.add_argument(f"--{flag}", dest=key, action="store_const",
                       const=not flag.startswith("no-"), help=HELP.get(flag))
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
        atomic_torch_save(checkpoint, self.out / RUN_CHECKPOINT_FILE)
        if final:
            atomic_torch_save(model, self.out / MODEL_FILE)
            atomic_write_text(json.dumps(metrics, indent=2) + "\n", self.out / RUN_METRICS_FILE)


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
    check_compile(cfg)
    return cfg


def check_compile(cfg: TrainConfig) -> None:
    """--compile on a CPU generates C++: without a working compiler the first step fails after
    seconds of tracing with pages of traceback, so refuse it here, before --out is created."""
    if not cfg.compile or pick_device(cfg.device).type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"--compile on the CPU needs a working C++ compiler ({type(e).__name__}: {first}); "
                          f"accepted: the run without --compile, or CXX set to a C++ compiler") from None


def compile_failure(e: BaseException) -> str | None:
    """The root cause of a torch.compile failure in one line (its traceback runs to pages), or
    None when `e` did not come from torch.compile."""
    from torch._dynamo.exc import TorchDynamoException

    if not isinstance(e, TorchDynamoException):
        return None
    root: BaseException = e
    while True:
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None or inner is root:
            break
        root = inner
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0] if lines else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    out = Path(ns.out)
    stored_state = None
    if ns.resume:
        ck = out / RUN_CHECKPOINT_FILE
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
    except Exception as e:
        why = compile_failure(e) if cfg.compile else None
        if why:
            fail(f"--compile: torch.compile failed ({why}); accepted: the same run "
                 f"without --compile (checkpoints from before the failure resume without it)")
        raise
    final = {k: metrics[k] for k in FINAL_KEYS} | {k: metrics[k] for k in LATENCY_KEYS if k in metrics}
    final.update({k: metrics[k] for k in ("test_cw_acc",) if k in metrics})
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
