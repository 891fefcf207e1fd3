"""Training one row of the grid (in this process or a worker) and handing it to evaluation."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainables.config import ConfigError, TrainConfig
from trainables.contract import CHANNEL_SPARSITY
from trainables.data import DataBundle, load_data, unpack_archive
from trainables.robust_eval import StrongEvalConfig

from .evaluation import evaluate_row
from .grid import SHARED_CIFAR, RowSpec, Scale


def resolve_dataset(args: argparse.Namespace) -> tuple[str, str]:
    """(dataset name for TrainConfig, a human description of the data)."""
    if args.dataset:
        return args.dataset, args.dataset
    src = Path(os.path.expanduser(args.cifar)) if args.cifar else SHARED_CIFAR
    if not src.exists():
        raise ConfigError(
            f"CIFAR-10 not found at {str(src)!r}; pass --cifar PATH (.tar.gz or unpacked folder) or "
            f"--dataset cifar10 --data-root DIR [--download]"
        )
    if src.is_dir():
        return f"folder:{src}", f"CIFAR-10 JPEG folder {src}"
    folder = unpack_archive(src, Path(os.path.expanduser(args.cache_dir)))
    return f"folder:{folder}", f"CIFAR-10 JPEG copy ({src.name}, unpacked to {folder})"


def run_row(spec: RowSpec, cfg: TrainConfig, data: DataBundle, scale: Scale, seeds: list[int],
            strong: StrongEvalConfig, source_adv: dict[int, torch.Tensor] | None,
            log: Callable[[str], None]) -> tuple[dict, dict[int, torch.Tensor] | None]:
    """Train one row and evaluate it; returns (results, the row's transfer examples per seed if
    it is a transfer source). Quantized rows need the examples of their source (`source_adv`)."""
    from trainables.loop import Run

    t0 = time.perf_counter()
    run = Run(cfg, data)
    for _ in range(cfg.epochs):
        te = time.perf_counter()
        stats = run.train_epoch()
        st = run.structure()
        log(f"[{spec.id}] epoch {run.epoch}/{cfg.epochs} loss {stats['train_loss']:.4f} "
            f"w_sparsity {100 * st['weight_sparsity']:.1f}% ch_sparsity {100 * st[CHANNEL_SPARSITY]:.1f}% "
            f"({time.perf_counter() - te:.0f}s)")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    per_seed, adv, strong_res = evaluate_row(run, spec, scale, seeds, strong, source_adv, log)
    eval_s = time.perf_counter() - t1
    return ({"id": spec.id, "per_seed": per_seed, "strong": strong_res, "structure": run.structure(),
             "train_s": train_s, "eval_s": eval_s, "group_lasso": cfg.group_lasso}, adv)


def log_stderr(s: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {s}", file=sys.stderr, flush=True)


def worker_init(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def row_job(spec: RowSpec, cfg: TrainConfig, scale: Scale, seeds: list[int], strong: StrongEvalConfig,
            source_adv: dict[int, torch.Tensor] | None, quiet: bool):
    """One row in a worker process (`--jobs`): loads its own copy of the (same) data."""
    log = (lambda s: None) if quiet else log_stderr
    return run_row(spec, cfg, load_data(cfg), scale, seeds, strong, source_adv, log)
