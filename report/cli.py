"""`python -m report`: the findings report, a fixed grid on CIFAR-10 written to docs/findings.md.

It trains float, 4-bit, ternary and binary EnResNets under `madry` and under the trade-off loss
(`mix`) with the proximal group penalty, plus one En2 row, evaluates each over several seeds of the
test-time noise (clean, FGSM, PGD-20, CW-Linf, and a transfer PGD-20 from the float model) and once
with the strong suite (AutoAttack-rand, Square, EOT-PGD and the sanity battery of
trainables.robust_eval), and writes a markdown report whose verdicts on the paper's claims are
computed from the measured numbers with stated thresholds.

`--full` is the paper's setting (for a GPU). Data: the shared CIFAR-10 JPEG copy (unpacked once to
a cache folder), or `--cifar PATH` (a .tar.gz or an unpacked folder), or any training-core dataset
via `--dataset` (e.g. torchvision's `cifar10` with `--data-root`/`--download`, or `digits` for a
quick smoke test).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainables.cliutil import OneLineParser, fail
from trainables.config import AttackConfig, ConfigError, TrainConfig, dataset_eps
from trainables.data import check_available, load_data
from trainables.fileio import atomic_torch_save, atomic_write_text
from trainables.robust_eval import StrongEvalConfig

from .grid import (
    ALPHA,
    DEFAULT_CACHE,
    DEFAULT_SCALE,
    EPS,
    FULL_SCALE,
    GROUP_SHRINK,
    ROWS,
    SHARED_CIFAR,
    RowSpec,
    Scale,
    is_source,
    row_config,
    select_rows,
    strong_config,
    sum_lr,
    transfer_source,
)
from .render import git_sha, machine, previous_findings, render
from .rows import log_stderr, resolve_dataset, row_job, run_row, worker_init

STRONG_FLAGS = {  # CLI flag -> StrongEvalConfig field (defaults and reasons: docs/training.md)
    "aa_steps": int, "aa_eot": int, "aa_restarts": int, "square_queries": int, "eot_samples": int,
    "eot_steps": int,
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m report", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULT_SCALE
    sd = StrongEvalConfig()
    p.add_argument("--full", action="store_true",
                   help="the paper setting: ResNet20 width 16, PGD-10 training, 200 epochs, all "
                        "training images, 10,000 test images, IFGSM-20 as well (for a GPU)")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument("--subset-train", type=int, help=f"training images drawn (default {d.subset_train}; 0 = all)")
    p.add_argument("--subset-test", type=int, help=f"test images (default {d.subset_test}; 0 = all)")
    p.add_argument("--strong-subset", type=int,
                   help=f"test images the strong suite runs on, the first N of the test subset (default "
                        f"{d.strong_subset}; 0 = all)")
    for defaults, key, what in ((d, "width", "base width"), (d, "depth", "depth 6n+2"),
                                (d, "attack_steps", "PGD steps of the training attack"),
                                (d, "eval_steps", "PGD/CW steps of the evaluation attacks"),
                                (d, "eval_seeds", "number of test-time noise seeds"), (d, "batch_size", "training batch"),
                                (sd, "aa_steps", "APGD steps of AutoAttack-rand"),
                                (sd, "aa_eot", "noise draws per APGD gradient"), (sd, "aa_restarts", "APGD restarts"),
                                (sd, "square_queries", "Square queries"),
                                (sd, "eot_samples", "noise draws per EOT-PGD gradient"), (sd, "eot_steps", "EOT-PGD steps")):
        p.add_argument("--" + key.replace("_", "-"), type=int, help=f"{what} (default {getattr(defaults, key)})")
    p.add_argument("--ifgsm", action="store_true", help="also report IFGSM (always on with --full)")
    p.add_argument("--alpha", type=float, help=f"natural-term weight of `mix` (default {ALPHA})")
    p.add_argument("--group-shrink", type=float, default=GROUP_SHRINK,
                   help=f"total proximal shrinkage lambda_g * sum_t lr_t of the mix rows; lambda_g "
                        f"follows from the run's schedule (default {GROUP_SHRINK})")
    p.add_argument("--group-lasso", type=float, help="lambda_g of the mix rows, overriding --group-shrink")
    p.add_argument("--rows", help="comma-separated subset of rows: " + ", ".join(ROWS))
    p.add_argument("--out", default="docs/findings.md", help="markdown report (default docs/findings.md)")
    p.add_argument("--previous", help="an earlier findings.md (a path, or git REV:PATH): the report then "
                                      "says what changed and which verdicts moved")
    p.add_argument("--json", help="also write the raw per-seed results here")
    p.add_argument("--work-dir", help="keep each finished row here and reuse it when rerun with "
                                      "the same settings (survives interruptions)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--jobs", type=int, default=0,
                   help="rows trained at once in worker processes (default: 2 on a CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per job (default: cores / jobs). On a shared, busy "
                        "machine two 1-thread jobs are much steadier than one 2-thread job")
    p.add_argument("--seed", type=int, default=0, help="training seed (the same for every row)")
    p.add_argument("--cifar", help="CIFAR-10 JPEG archive (.tar.gz) or unpacked folder "
                                   f"(default: {SHARED_CIFAR})")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the archive is unpacked")
    p.add_argument("--dataset", help="any training-core dataset instead (cifar10 with --data-root, "
                                     "folder:PATH, or digits for a smoke test)")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def scale_from_args(a: argparse.Namespace) -> Scale:
    s = dataclasses.replace(FULL_SCALE if a.full else DEFAULT_SCALE)
    for name in ("epochs", "width", "depth", "attack_steps", "eval_steps", "eval_seeds", "batch_size"):
        v = getattr(a, name)
        if v is not None:
            if v < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={v}; accepted: an integer >= 1")
            setattr(s, name, v)
    for name in ("subset_train", "subset_test", "strong_subset"):
        v = getattr(a, name)
        if v is not None:
            if v < 0:
                raise ConfigError(f"--{name.replace('_', '-')}={v}; accepted: an integer >= 0 (0 = all)")
            setattr(s, name, v or None)
    if a.ifgsm:
        s.ifgsm = True
    return s


def strong_from_args(a: argparse.Namespace, scale: Scale, seed: int, eps: float = EPS) -> StrongEvalConfig:
    over = {k: getattr(a, k) for k in STRONG_FLAGS}
    for k, v in over.items():
        if v is not None and v < 1:
            raise ConfigError(f"--{k.replace('_', '-')}={v}; accepted: an integer >= 1")
    return strong_config(scale, over, seed, eps)


def cache_key(spec: RowSpec, cfg: TrainConfig, scale: Scale, seeds: list[int], data_desc: str,
              strong: StrongEvalConfig) -> str:
    blob = json.dumps({"row": dataclasses.asdict(spec), "cfg": cfg.to_flat(),
                       "scale": dataclasses.asdict(scale), "seeds": seeds, "data": data_desc,
                       "strong": dataclasses.asdict(strong)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _br_text(cfg: TrainConfig) -> str:
    q = cfg.quant
    if getattr(q, "lambda_schedule", "rho") == "final":
        grow = (f"lambda grows geometrically per optimizer step from lambda0 {q.lambda0:g} to "
                f"lambda_final {q.lambda_final:g} at the start of phase II")
    else:
        grow = f"lambda0 {q.lambda0:g}, rho {q.rho:g} per epoch"
    return f"{grow}, hard quantization from {100 * q.phase2_start:g}% of the epochs"


def _read_previous(spec: str) -> str:
    """A findings.md path, or REV:PATH for a committed version (e.g. main~3:docs/findings.md)."""
    if Path(spec).is_file():
        return Path(spec).read_text()
    if ":" in spec:
        import subprocess

        from .grid import REPO

        proc = subprocess.run(["git", "show", spec], cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return proc.stdout
    raise ConfigError(f"--previous {spec}: neither a readable file nor a git REV:PATH; "
                      "accepted: a findings.md path or e.g. main:docs/findings.md")


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    log: Callable[[str], None] = (lambda s: None) if args.quiet else log_stderr
    t_start = time.perf_counter()
    load_start = _load()
    sha = git_sha()  # the code that runs, even if the checkout moves on during a long run
    from trainables.loop import pick_device

    try:
        on_gpu = pick_device(args.device).type == "cuda"
    except RuntimeError as e:
        fail(f"--device={args.device!r}: {e}")
    if args.jobs == 0:
        args.jobs = 1 if on_gpu else 2
    if args.threads == 0 and not on_gpu:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if args.jobs < 0 or args.threads < 0:
            raise ConfigError(f"--jobs={args.jobs} --threads={args.threads}; accepted: integers >= 0 (0 = auto)")
        scale = scale_from_args(args)
        rows = select_rows([r for r in args.rows.split(",") if r] if args.rows else None)
        alpha = ALPHA if args.alpha is None else args.alpha
        seeds = [1000 + i for i in range(scale.eval_seeds)]
        strong = strong_from_args(args, scale, seeds[0])
        previous = None
        if args.previous:
            previous = previous_findings(_read_previous(args.previous))
        dataset, data_desc = resolve_dataset(args)
        eps = dataset_eps(dataset)  # the dataset's threat model (folder: the CIFAR-10 JPEG copy, 8/255)
        strong = strong_from_args(args, scale, seeds[0], eps)
        base = TrainConfig(
            dataset=dataset, data_root=args.data_root, download=args.download,
            subset_train=scale.subset_train, subset_test=scale.subset_test,
            val_fraction=scale.val_fraction, depth=scale.depth, width=scale.width,
            epochs=scale.epochs, batch_size=scale.batch_size, alpha=alpha,
            group_mode="prox", group_axis="out", seed=args.seed, device=args.device, cw=True,
        )
        base.quant.bits = 32
        base.train_attack = AttackConfig("pgd", eps, 2.5 * eps / scale.attack_steps,
                                         scale.attack_steps, True)
        base.validate()
        check_available(base)
    except ConfigError as e:
        fail(str(e))
    log(f"loading {data_desc}")
    data = load_data(base)
    n_train = len(data.train)
    slr = sum_lr(base, n_train)
    group_lasso = args.group_lasso if args.group_lasso is not None else args.group_shrink / slr
    steps = (n_train // base.batch_size + (1 if n_train % base.batch_size >= 2 else 0)) * base.epochs
    log(f"{n_train} training / {len(data.test)} test images; lambda_g = {group_lasso:.4g}; rows: "
        + ", ".join(r.id for r in rows))

    work = Path(args.work_dir) if args.work_dir else None
    R: dict[str, dict] = {}
    transfer_sets: dict[str, dict[int, torch.Tensor]] = {}

    def paths(spec: RowSpec, cfg: TrainConfig) -> tuple[Path | None, Path | None]:
        if not work:
            return None, None
        key = cache_key(spec, cfg, scale, seeds, data_desc, strong)
        return work / f"{spec.id}-{key}.json", work / f"{spec.id}-{key}-transfer.pt"

    def finish(spec: RowSpec, cfg: TrainConfig, res: dict, adv: dict | None) -> None:
        R[spec.id] = res
        if adv is not None:
            transfer_sets[spec.id] = adv
        log(f"[{spec.id}] done: train {res['train_s']:.0f}s, eval {res['eval_s']:.0f}s")
        cj, ca = paths(spec, cfg)
        if cj:
            if adv is not None:
                atomic_torch_save(adv, ca)
            atomic_write_text(json.dumps(res, indent=1) + "\n", cj)

    # transfer sources first, then the rest; within a stage rows may run in parallel (--jobs)
    done = 0
    for stage in ([r for r in rows if is_source(r)], [r for r in rows if not is_source(r)]):
        todo: list[tuple[RowSpec, TrainConfig]] = []
        for spec in stage:
            cfg = row_config(base, spec, group_lasso)
            cj, ca = paths(spec, cfg)
            if cj and cj.is_file() and (not is_source(spec) or ca.is_file()):
                R[spec.id] = json.loads(cj.read_text())
                if is_source(spec):
                    transfer_sets[spec.id] = torch.load(ca)
                done += 1
                log(f"[{spec.id}] reused from {cj}")
            else:
                todo.append((spec, cfg))
        todo.sort(key=lambda t: -t[0].ensemble)  # longest first balances the workers

        def source_of(spec: RowSpec) -> dict[int, torch.Tensor] | None:
            return transfer_sets[transfer_source(spec)] if spec.bits != 32 else None

        if args.jobs > 1 and len(todo) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(min(args.jobs, len(todo)), mp_context=mp.get_context("spawn"),
                                     initializer=worker_init, initargs=(args.threads,)) as pool:
                futs = {}
                for spec, cfg in todo:
                    log(f"[{spec.id}] queued: {spec.precision}, {spec.loss_label}, En{spec.ensemble}")
                    futs[pool.submit(row_job, spec, cfg, scale, seeds, strong, source_of(spec),
                                     args.quiet)] = (spec, cfg)
                for fut in as_completed(futs):
                    spec, cfg = futs[fut]
                    done += 1
                    finish(spec, cfg, *fut.result())
        else:
            for spec, cfg in todo:
                done += 1
                log(f"[{spec.id}] row {done}/{len(rows)}: {spec.precision}, {spec.loss_label}, "
                    f"En{spec.ensemble}")
                finish(spec, cfg, *run_row(spec, cfg, data, scale, seeds, strong, source_of(spec), log))

    strong_seconds: dict[str, float] = {}
    for r in R.values():
        for k, v in r["strong"].get("seconds", {}).items():
            strong_seconds[k] = strong_seconds.get(k, 0.0) + v
    command = "python -m report" + ("" if not argv else " " + shlex.join(argv))
    meta = {
        "command": command,
        "git": sha,
        "machine": machine(),
        "load": f"{load_start} / {_load()}",
        "wall_s": time.perf_counter() - t_start,
        "train_s": sum(r["train_s"] for r in R.values()),
        "eval_s": sum(r["eval_s"] for r in R.values()),
        "data": data_desc,
        "n_train": n_train, "n_val": len(data.val), "n_test": len(data.test),
        "n_strong": min(scale.strong_subset or len(data.test), len(data.test)),
        "augment": data.augment,
        "train_step": base.train_attack.step,
        "eps": eps,
        "group_lasso": group_lasso, "group_shrink": group_lasso * slr,
        "sum_lr": slr, "steps": steps, "br": _br_text(base),
        "seeds": seeds, "alpha": alpha, "jobs": args.jobs, "threads": args.threads,
        "strong": dataclasses.asdict(strong), "strong_seconds": strong_seconds,
        "previous": previous,
    }
    full = args.full and dataclasses.replace(scale, eval_seeds=FULL_SCALE.eval_seeds) == FULL_SCALE
    text = render(meta, R, rows, scale, full)
    atomic_write_text(text, args.out)
    if args.json:
        atomic_write_text(json.dumps({"meta": meta, "scale": dataclasses.asdict(scale), "rows": R},
                                     indent=1) + "\n", args.json)
    log(f"wrote {args.out} ({meta['wall_s'] / 60:.1f} min)")
    return 0
