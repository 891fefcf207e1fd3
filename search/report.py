"""`python -m search.report`: the findings report, a fixed grid on CIFAR-10 written to docs/findings.md.

It trains float, 4-bit, ternary and binary EnResNets under `madry` and under the trade-off loss
(`mix`) with the proximal group penalty, plus one En2 row, evaluates each over several seeds of the
test-time noise (clean, FGSM, PGD-20, CW-Linf, and a transfer PGD-20 from the float model as a
guard against gradient masking), and writes a markdown report whose verdicts on the paper's
claims are computed from the measured numbers with stated thresholds.

The default scale fits about an hour on 2 CPU cores; `--full` is the paper's setting (for a GPU).
Data: the shared CIFAR-10 JPEG copy (unpacked once to a cache folder), or `--cifar PATH` (a
.tar.gz or an unpacked folder), or any training-core dataset via `--dataset` (e.g. torchvision's
`cifar10` with `--data-root`/`--download`, or `digits` for a quick smoke test).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainables.cliutil import OneLineParser, fail
from trainables.config import AttackConfig, ConfigError, TrainConfig
from trainables.data import DataBundle, check_available, load_data, unpack_archive
from trainables.fileio import atomic_torch_save, atomic_write_text
from trainables.attacks import perturb
from trainables.metrics import accuracy

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository into its own folder with shared/ beside it
SHARED_CIFAR = REPO.parent / "shared/data/cifar10-jpeg.tar.gz"
DEFAULT_CACHE = Path("~/.cache/brsearch")
EPS = 8 / 255
EVAL_STEP = 2 / 255

# EnResNet poster, CIFAR-10, PGD-10 adversarial training (docs: algorithms.md section 4.1)
REFERENCE_EN1 = {"clean": 77.21, "fgsm": 55.35, "ifgsm": 49.06}

# Verdict thresholds, in percentage points (pp) of accuracy or of sparsity.
SPARSE_MIN = 10.0  # (a) "sparse": at least this % of the quantized weights are exact zeros
UNSTRUCTURED_RATIO = 0.25  # (b) "far below": channel sparsity <= this fraction of weight sparsity
CLEAN_GAIN_MIN = 1.0  # (c) clean accuracy "raised": mix+group minus madry >= +1 pp
CHANNEL_GAIN_MIN = 5.0  # (c) channel sparsity "raised": >= +5 pp
FGSM_LOSS_MAX = 1.0  # (c) "no loss under FGSM": drop <= 1 pp
STRONG_LOSS_MAX = 3.0  # (c) "little loss under PGD-20 and CW": drop <= 3 pp


# ------------------------------------------------------------------------------------------
# scale and grid


@dataclass
class Scale:
    subset_train: int | None  # images drawn from the training set (a small share held out)
    subset_test: int | None
    width: int
    depth: int
    epochs: int
    attack_steps: int  # PGD steps of the training attack
    eval_steps: int = 20
    eval_seeds: int = 3
    batch_size: int = 128
    val_fraction: float = 0.02
    ifgsm: bool = False  # also report IFGSM-20 (no random start; the EnResNet protocol)


# Sized from measurements on 2 CPU cores (docs/findings.md, "Scale"): ResNet20 at width 8 costs
# ~13 ms per image for a PGD-3 training step and ~2.5 ms per image for an attack step on one
# thread, so this grid with 1,000 test images takes under an hour of two otherwise idle cores.
DEFAULT_SCALE = Scale(subset_train=2000, subset_test=1000, width=8, depth=20, epochs=8,
                      attack_steps=3, batch_size=32)
FULL_SCALE = Scale(subset_train=None, subset_test=None, width=16, depth=20, epochs=200,
                   attack_steps=10, val_fraction=0.1, ifgsm=True)

ALPHA = 0.2  # weight of the natural term in `mix`
# The group penalty is the proximal step W_g <- max(0, 1 - lr*lambda_g/||W_g||) W_g. Its effect in
# a short run is set by the total shrinkage lambda_g * sum_t lr_t, so lambda_g defaults to
# GROUP_SHRINK / sum_t lr_t for the run's schedule (calibrated at the default scale).
GROUP_SHRINK = 2.0  # at the default scale: ~24% zero filters (ternary) at no cost in clean accuracy


@dataclass(frozen=True)
class RowSpec:
    id: str
    bits: int
    loss: str  # madry | mix (mix always with the group penalty)
    ensemble: int = 1

    @property
    def precision(self) -> str:
        return {32: "float", 4: "4-bit", 2: "ternary", 1: "binary"}[self.bits]

    @property
    def loss_label(self) -> str:
        return "madry" if self.loss == "madry" else "mix + group"

    @property
    def model_label(self) -> str:
        return f"En{self.ensemble}"


ROWS: dict[str, RowSpec] = {
    r.id: r
    for r in [
        RowSpec("float-madry", 32, "madry"),
        RowSpec("4bit-madry", 4, "madry"),
        RowSpec("ternary-madry", 2, "madry"),
        RowSpec("binary-madry", 1, "madry"),
        RowSpec("float-mix", 32, "mix"),
        RowSpec("4bit-mix", 4, "mix"),
        RowSpec("ternary-mix", 2, "mix"),
        RowSpec("binary-mix", 1, "mix"),
        RowSpec("float-madry-en2", 32, "madry", ensemble=2),
    ]
}
QUANT_BITS = (4, 2, 1)


def transfer_source(spec: RowSpec) -> str:
    return f"float-{spec.loss}"


def select_rows(names: list[str] | None) -> list[RowSpec]:
    """Rows in grid order; every quantized row brings the float row of its loss (the transfer
    attack's source model)."""
    if not names:
        return list(ROWS.values())
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ConfigError(f"unknown row {unknown[0]!r}; accepted: {', '.join(ROWS)}")
    want = set(names)
    for n in names:
        if ROWS[n].bits != 32:
            want.add(transfer_source(ROWS[n]))
    return [r for r in ROWS.values() if r.id in want]


# ------------------------------------------------------------------------------------------
# data


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


# ------------------------------------------------------------------------------------------
# one row


def sum_lr(cfg: TrainConfig, n_train: int) -> float:
    """sum over optimizer steps of the learning rate (MultiStep x0.1 at the lr_milestones)."""
    steps = n_train // cfg.batch_size + (1 if n_train % cfg.batch_size >= 2 else 0)
    milestones = sorted({int(round(f * cfg.epochs)) for f in cfg.lr_milestones} - {0})
    return sum(steps * cfg.lr * 0.1 ** sum(e >= m for m in milestones) for e in range(cfg.epochs))


def row_config(base: TrainConfig, spec: RowSpec, group_lasso: float) -> TrainConfig:
    cfg = dataclasses.replace(
        base, quant=dataclasses.replace(base.quant, bits=spec.bits),
        train_attack=dataclasses.replace(base.train_attack),
        eval_attack=dataclasses.replace(base.eval_attack),
        ensemble=spec.ensemble, loss=spec.loss,
        group_lasso=group_lasso if spec.loss == "mix" else 0.0,
    )
    cfg.validate()
    return cfg


def eval_attacks(scale: Scale) -> dict[str, AttackConfig | None]:
    atk: dict[str, AttackConfig | None] = {
        "clean": None,
        "fgsm": AttackConfig("fgsm", EPS, EPS, 1, False),
        "pgd": AttackConfig("pgd", EPS, EVAL_STEP, scale.eval_steps, True),
        "cw": AttackConfig("cw", EPS, EVAL_STEP, scale.eval_steps, True),
    }
    if scale.ifgsm:
        atk["ifgsm"] = AttackConfig("pgd", EPS, EVAL_STEP, scale.eval_steps, False)
    return atk


def _fork_rng(device: torch.device):
    """Seeded evaluation without disturbing the global RNG streams."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def craft(run, x: torch.Tensor, y: torch.Tensor, atk: AttackConfig, seed: int,
          batch_size: int = 256) -> torch.Tensor:
    """White-box adversarial examples on `run`'s deployed model (eval mode, noise on, seeded)."""
    model, br = run.model, run.br
    was = model.training
    model.eval()
    out = []
    try:
        with _fork_rng(run.device), br.quantized():
            torch.manual_seed(seed)
            for i in range(0, len(x), batch_size):
                out.append(perturb(model, x[i : i + batch_size], y[i : i + batch_size], atk))
    finally:
        model.train(was)
    return torch.cat(out)


def transfer_accuracy(run, x_adv: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    with _fork_rng(run.device):
        torch.manual_seed(seed)
        return accuracy(run.model, run.br, x_adv, y, {"transfer": None})["transfer"]


def is_source(spec: RowSpec) -> bool:
    """Float En1 rows: the models the transfer attack is crafted on."""
    return spec.bits == 32 and spec.ensemble == 1


def run_row(spec: RowSpec, cfg: TrainConfig, data: DataBundle, scale: Scale, seeds: list[int],
            source_adv: dict[int, torch.Tensor] | None, log: Callable[[str], None],
            ) -> tuple[dict, dict[int, torch.Tensor] | None]:
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
            f"w_sparsity {100 * st['weight_sparsity']:.1f}% ch_sparsity {100 * st['channel_sparsity']:.1f}% "
            f"({time.perf_counter() - te:.0f}s)")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    attacks = eval_attacks(scale)
    per_seed: dict[str, list[float]] = {k: [] for k in attacks}
    for s in seeds:
        res = run.evaluate(seed=s, attacks=attacks, split="test")
        for k, v in res.items():
            per_seed[k].append(100.0 * v)
        log(f"[{spec.id}] seed {s}: " + " ".join(f"{k} {100 * v:.1f}" for k, v in res.items()))
    x, y = run.data.test.to_float(run.device)
    adv = None
    if is_source(spec):
        pgd = attacks["pgd"]
        assert pgd is not None
        adv = {s: craft(run, x, y, pgd, s).cpu() for s in seeds}
    if spec.bits != 32:
        assert source_adv is not None
        src = source_adv
        per_seed["transfer"] = [100.0 * transfer_accuracy(run, src[s].to(run.device), y, s) for s in seeds]
        log(f"[{spec.id}] transfer PGD-{scale.eval_steps} from {transfer_source(spec)}: "
            + " ".join(f"{v:.1f}" for v in per_seed["transfer"]))
    struct = run.structure()
    eval_s = time.perf_counter() - t1
    return ({"id": spec.id, "per_seed": per_seed, "structure": struct, "train_s": train_s,
             "eval_s": eval_s, "group_lasso": cfg.group_lasso}, adv)


def _log_stderr(s: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {s}", file=sys.stderr, flush=True)


def _worker_init(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def _row_job(spec: RowSpec, cfg: TrainConfig, scale: Scale, seeds: list[int],
             source_adv: dict[int, torch.Tensor] | None, quiet: bool):
    """One row in a worker process (`--jobs`): loads its own copy of the (same) data."""
    log = (lambda s: None) if quiet else _log_stderr
    return run_row(spec, cfg, load_data(cfg), scale, seeds, source_adv, log)


# ------------------------------------------------------------------------------------------
# statistics and verdicts


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((v - m) ** 2 for v in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def m(res: dict, key: str) -> float:
    return mean_sd(res["per_seed"][key])[0]


def pct(v: float) -> str:
    return f"{v:.1f}%"


def masking_flag(res: dict) -> bool | None:
    """True when white-box PGD-20 accuracy exceeds the transfer PGD-20 accuracy (mean over seeds):
    a stronger attack from a different model should never beat the white-box one."""
    if "transfer" not in res["per_seed"]:
        return None
    return m(res, "pgd") > m(res, "transfer")


@dataclass
class Verdict:
    claim: str
    status: str  # holds | partly holds | does not hold | not tested
    lines: list[str] = field(default_factory=list)


def _status(ok: list[bool], ran: list[str], needed: tuple[str, ...] | list[str]) -> str:
    status = "holds" if all(ok) else "partly holds" if any(ok) else "does not hold"
    missing = [n for n in needed if n not in ran]
    if missing:
        status += " on the rows run (not run: " + ", ".join(missing) + ")"
    return status


def verdict_a(R: dict[str, dict]) -> Verdict:
    claim = "(a) Ternary and 4-bit BR make the weights sparse."
    v = Verdict(claim, "not tested")
    rows = [r for r in ("4bit-madry", "ternary-madry", "4bit-mix", "ternary-mix") if r in R]
    madry = [r for r in ("4bit-madry", "ternary-madry") if r in R]
    if not madry:
        v.lines.append("Needs the 4bit-madry and ternary-madry rows.")
        return v
    ok = []
    for r in rows:
        ws = 100 * R[r]["structure"]["weight_sparsity"]
        good = ws >= SPARSE_MIN
        if r in madry:
            ok.append(good)
        v.lines.append(f"{r}: weight sparsity {pct(ws)} ({'>=' if good else '<'} {SPARSE_MIN:g}%).")
    for r in ("float-madry", "binary-madry"):
        if r in R:
            v.lines.append(f"For contrast, {r}: {pct(100 * R[r]['structure']['weight_sparsity'])}.")
    v.status = _status(ok, madry, ("4bit-madry", "ternary-madry"))
    v.lines.append(
        f"Rule: holds if both 4bit-madry and ternary-madry have at least {SPARSE_MIN:g}% exact-zero "
        "quantized weights (madry rows: the BR effect without the group penalty)."
    )
    return v


def verdict_b(R: dict[str, dict]) -> Verdict:
    claim = ("(b) Under adversarial training that sparsity is unstructured "
             "(channel sparsity far below weight sparsity).")
    v = Verdict(claim, "not tested")
    madry = [r for r in ("4bit-madry", "ternary-madry") if r in R]
    if not madry:
        v.lines.append("Needs the 4bit-madry and ternary-madry rows.")
        return v
    ok = []
    for r in madry:
        s = R[r]["structure"]
        ws, cs, ci = (100 * s["weight_sparsity"], 100 * s["channel_sparsity"],
                      100 * s["channel_sparsity_in"])
        good = ws > 0 and max(cs, ci) <= UNSTRUCTURED_RATIO * ws
        ok.append(good)
        v.lines.append(f"{r}: weight sparsity {pct(ws)}, zero output filters {pct(cs)}, zero input "
                       f"channels {pct(ci)} ({'<=' if good else '>'} {UNSTRUCTURED_RATIO:g} x weight sparsity).")
    v.status = _status(ok, madry, ("4bit-madry", "ternary-madry"))
    v.lines.append(
        f"Rule: holds if, for both madry rows, channel sparsity (output and input axis) is at most "
        f"{UNSTRUCTURED_RATIO:g} x the weight sparsity. The contrast the paper draws with natural "
        "training (structured sparsity there) is not part of this grid."
    )
    return v


def verdict_c(R: dict[str, dict], group_lasso: float, alpha: float) -> Verdict:
    claim = ("(c) The trade-off loss with the group penalty raises clean accuracy and channel "
             "sparsity, with no loss under FGSM and little under PGD-20 and CW-Linf.")
    v = Verdict(claim, "not tested")
    results, ran = [], []
    for prec in ("float", "4bit", "ternary", "binary"):
        a, b = f"{prec}-madry", f"{prec}-mix"
        if a not in R or b not in R:
            continue
        ran.append(f"{prec}-madry/mix")
        A, B = R[a], R[b]
        d = {k: m(B, k) - m(A, k) for k in ("clean", "fgsm", "pgd", "cw")}
        dch = 100 * (B["structure"]["channel_sparsity"] - A["structure"]["channel_sparsity"])
        parts = {
            "clean": d["clean"] >= CLEAN_GAIN_MIN,
            "channels": dch >= CHANNEL_GAIN_MIN,
            "fgsm": d["fgsm"] >= -FGSM_LOSS_MAX,
            "pgd": d["pgd"] >= -STRONG_LOSS_MAX,
            "cw": d["cw"] >= -STRONG_LOSS_MAX,
        }
        results.append(all(parts.values()))
        failed = [k for k, ok in parts.items() if not ok]
        v.lines.append(
            f"{prec}: mix+group minus madry: clean {d['clean']:+.1f} pp, zero filters {dch:+.1f} pp, "
            f"FGSM {d['fgsm']:+.1f} pp, PGD-20 {d['pgd']:+.1f} pp, CW-Linf {d['cw']:+.1f} pp -> "
            + ("all parts hold." if not failed else "fails on: " + ", ".join(failed) + ".")
        )
    if not results:
        v.lines.append("Needs matching madry and mix rows.")
        return v
    v.status = _status(results, ran, [f"{p}-madry/mix" for p in ("float", "4bit", "ternary", "binary")])
    v.lines.append(
        f"Rule (per bit width, mix with alpha={alpha:g} and lambda_g={group_lasso:.3g} against madry): "
        f"clean >= +{CLEAN_GAIN_MIN:g} pp, zero output filters >= +{CHANNEL_GAIN_MIN:g} pp, "
        f"FGSM >= -{FGSM_LOSS_MAX:g} pp, PGD-20 and CW-Linf >= -{STRONG_LOSS_MAX:g} pp (means over "
        "evaluation seeds). Holds if every bit width passes every part; partly if some widths pass."
    )
    return v


# ------------------------------------------------------------------------------------------
# markdown


def fmt(res: dict, key: str) -> str:
    if key not in res["per_seed"]:
        return "–"
    mu, sd = mean_sd(res["per_seed"][key])
    return f"{mu:.1f} ± {sd:.1f}"


def size_str(s: dict) -> str:
    kib = s["size_bits"] / 8 / 1024
    return f"{kib:.1f} KiB ({s['compression']:.1f}x)"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        dev += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{dev}; {platform.system()} {platform.release()}, Python {platform.python_version()}"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes to tracked files)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def render(meta: dict, R: dict[str, dict], rows: list[RowSpec], scale: Scale, full: bool) -> str:
    L: list[str] = []
    w = L.append
    gl = meta["group_lasso"]
    where = "CIFAR-10" if "cifar" in meta["data"].lower() else meta["data"]
    w(f"# Findings: Binary-Relax quantized, adversarially trained EnResNet on {where}")
    w("")
    w("Generated by `python -m search.report` (search/report.py); every number and every verdict "
      "below is computed by that script from this run. Do not edit by hand: regenerate it.")
    w("")
    w("## How to regenerate")
    w("")
    w("```bash")
    w(meta["command"])
    w("```")
    w("")
    w("- Default scale (about an hour on 2 CPU cores): `python -m search.report` (uses the shared "
      "CIFAR-10 JPEG copy, unpacked once to `~/.cache/brsearch/cifar10-jpeg`; or `--cifar PATH`, or "
      "`--dataset cifar10 --data-root DIR --download` for torchvision's copy).")
    w("- Paper scale (a GPU; days of compute): `python -m search.report --full --device cuda`.")
    w("- A subset of rows: `--rows ternary-madry,ternary-mix` (each quantized row brings the float "
      "row of its loss, the transfer-attack source). Rows: " + ", ".join(f"`{r}`" for r in ROWS) + ".")
    w("- `python -m search.report --help` lists every flag (`--epochs`, `--subset-train`, "
      "`--subset-test`, `--width`, `--depth`, `--attack-steps`, `--eval-seeds`, `--out`, "
      "`--device`, ...).")
    w("")
    w("## Run")
    w("")
    w(f"- Command: `{meta['command']}`")
    w(f"- Date (UTC): {meta['date']}")
    w(f"- Git SHA: {meta['git']}")
    w(f"- Machine: {meta['machine']}")
    w(f"- Wall time: {meta['wall_s'] / 60:.1f} min (training {meta['train_s'] / 60:.1f} min, "
      f"evaluation {meta['eval_s'] / 60:.1f} min, summed over rows)")
    w(f"- Data: {meta['data']}")
    w("")
    w("## Scale")
    w("")
    ntr, nval, nte = meta["n_train"], meta["n_val"], meta["n_test"]
    w(f"- Scale: **{'full (paper setting)' if full else 'reduced'}**; rows run "
      f"{meta['jobs']} at a time, {meta['threads'] or 'default'} torch thread(s) each.")
    if scale == DEFAULT_SCALE:
        w("- How the default was sized: on this 2-core machine a PGD-3 training step costs about "
          "13 ms per image and a PGD/CW attack step about 2.5 ms per image on one thread, so the "
          "grid (9 trainings, 3 x 42 attack steps per test image per row, the transfer crafting) "
          "with 1,000 test images fits in about an hour of both cores when the machine is "
          "otherwise idle. On a machine shared with other jobs, `--subset-test 500` halves the "
          "evaluation (an earlier run under a load average of 7 to 13 took 68.5 min with 500).")
    w(f"- Training images: {ntr} (plus {nval} held out as a validation split, unused here); "
      f"augmentation: {'random crop (pad 4) + horizontal flip' if meta['augment'] else 'none'}.")
    w(f"- Test images: {nte} (fixed subset, the same for every row).")
    w(f"- Model: pre-activation ResNet{scale.depth}, width {scale.width} "
      f"(stages {scale.width}/{2 * scale.width}/{4 * scale.width}), noise coefficient 0.1 after "
      "every block (on at test time too); En1 unless stated.")
    w(f"- Training: {scale.epochs} epochs, batch {scale.batch_size}, SGD (Nesterov, momentum 0.9, "
      f"weight decay 5e-4), lr 0.1 x0.1 at 50% and 75% of the epochs; training attack PGD-"
      f"{scale.attack_steps}, eps 8/255, step {meta['train_step'] * 255:.2f}/255 (2.5 eps / steps), "
      "random start.")
    w("- Binary-Relax: lambda0 1, rho 1.05 per epoch, hard quantization from 75% of the epochs; "
      "stem and 3x3 convolutions quantized (one scale per layer), 1x1 shortcuts, BN and the "
      "classifier float; ternary = the reference 0.7 mean|w| threshold rule; 4-bit = one Lloyd step.")
    w(f"- Losses: `madry` = CE(f(x_adv)); `mix + group` = (1 - alpha) CE(f(x_adv)) + alpha CE(f(x)) "
      f"with alpha = {meta['alpha']:g}, plus the proximal group-lasso step on output filters with "
      f"lambda_g = {gl:.4g} (= {meta['group_shrink']:g} / sum_t lr_t, sum_t lr_t = "
      f"{meta['sum_lr']:.1f} over {meta['steps']} optimizer steps: the total shrinkage per filter "
      "norm is then fixed, so the penalty acts at this scale).")
    w(f"- Evaluation: {len(meta['seeds'])} seeds of the test-time noise (seeds {meta['seeds']}), "
      f"mean ± sd (sample sd). FGSM eps 8/255; PGD-{scale.eval_steps}: eps 8/255, step 2/255, "
      f"random start, CE loss; CW-Linf: the same PGD on the margin loss max_(j != y) Z_j - Z_y "
      "(our definition; not the rescaled C&W-L2 of the EnResNet scripts)"
      + (f"; IFGSM-{scale.eval_steps}: as PGD without random start (the EnResNet protocol)"
         if scale.ifgsm else "") + ". All on the fully quantized weights, model in eval mode.")
    w(f"- Transfer (gradient-masking guard): PGD-{scale.eval_steps} examples crafted white-box on "
      "the float model trained with the same loss (same seed), then classified by the quantized "
      "model.")
    w("")
    w("## Results")
    w("")
    ifg = scale.ifgsm
    head = ["row", "model", "precision", "loss", "clean", "FGSM", f"PGD-{scale.eval_steps}"]
    if ifg:
        head.append(f"IFGSM-{scale.eval_steps}")
    head += ["CW-L∞", f"transfer PGD-{scale.eval_steps}", "weight sparsity",
             "channel sparsity (out / in)", "size", "masking flag"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for spec in rows:
        r = R[spec.id]
        s = r["structure"]
        flag = masking_flag(r)
        cells = [f"`{spec.id}`", spec.model_label, spec.precision, spec.loss_label,
                 fmt(r, "clean"), fmt(r, "fgsm"), fmt(r, "pgd")]
        if ifg:
            cells.append(fmt(r, "ifgsm"))
        cells += [fmt(r, "cw"), fmt(r, "transfer"), pct(100 * s["weight_sparsity"]),
                  f"{pct(100 * s['channel_sparsity'])} / {pct(100 * s['channel_sparsity_in'])}",
                  size_str(s), "–" if flag is None else ("**FLAG**" if flag else "ok")]
        w("| " + " | ".join(cells) + " |")
    w("")
    w("Accuracies in % of the test images (every image counts), mean ± sd over the evaluation "
      "seeds; the sd covers the test-time noise only, not the training seed (one training run "
      "per row). Sparsity is counted on the quantized weights (stem + 3x3 convs, all members); "
      "channel sparsity = all-zero output filters / all-zero input channels. Size = bits of the "
      "deployed weights (b per quantized weight + one 32-bit scale per layer, 32 bits per float "
      "parameter), compression against all-float in brackets.")
    w("")
    w("### Gradient-masking guard")
    w("")
    qrows = [spec for spec in rows if spec.bits != 32]
    if not qrows:
        w("No quantized rows in this run.")
    for spec in qrows:
        r = R[spec.id]
        wb, tr = m(r, "pgd"), m(r, "transfer")
        flag = masking_flag(r)
        w(f"- `{spec.id}`: white-box PGD-{scale.eval_steps} {pct(wb)}, transfer from "
          f"`{transfer_source(spec)}` {pct(tr)} -> "
          + (f"**FLAG**: white-box exceeds transfer by {wb - tr:.1f} pp, so the white-box number "
             "overstates robustness (gradient masking likely); read this row's robust accuracy as "
             f"at most {pct(tr)}." if flag else f"ok (transfer is {tr - wb:.1f} pp weaker than white-box)."))
    w("")
    w("Rule: a row is flagged when its mean white-box PGD accuracy is above its mean transfer PGD "
      "accuracy. An attack crafted on another model should not beat one that sees the model's own "
      "gradients; when it does, the quantized model's gradients are uninformative.")
    w("")
    if "float-madry" in R and "float-madry-en2" in R:
        a, b = R["float-madry"], R["float-madry-en2"]
        w("### En1 against En2 (float, madry)")
        w("")
        keys = [("clean", "clean"), ("fgsm", "FGSM"), ("pgd", f"PGD-{scale.eval_steps}"), ("cw", "CW-L∞")]
        if ifg:
            keys.insert(3, ("ifgsm", f"IFGSM-{scale.eval_steps}"))
        w("En2 minus En1: " + ", ".join(f"{lab} {m(b, k) - m(a, k):+.1f} pp" for k, lab in keys)
          + f"; size {b['structure']['size_bits'] / a['structure']['size_bits']:.1f}x. "
          "The EnResNet poster reports En2 above En1 by +3.1 pp clean, +1.9 pp FGSM, +1.0 pp "
          "IFGSM-20 at full scale.")
        w("")
    w("## The paper's claims at this scale")
    w("")
    for v in (verdict_a(R), verdict_b(R), verdict_c(R, gl, meta["alpha"])):
        w(f"**{v.claim}** Verdict: **{v.status}**.")
        w("")
        for line in v.lines:
            w(f"- {line}")
        w("")
    w("## Against the EnResNet reference")
    w("")
    if full and "float-madry" in R:
        r = R["float-madry"]
        ref = REFERENCE_EN1
        got = {"clean": m(r, "clean"), "fgsm": m(r, "fgsm"), "ifgsm": m(r, "ifgsm") if ifg else None}
        w("Float En1ResNet20 (madry, PGD-10 training) against the EnResNet poster (CIFAR-10):")
        w("")
        w("| metric | this run | reference | difference |")
        w("|---|---|---|---|")
        for k, lab in (("clean", "clean"), ("fgsm", "FGSM"), ("ifgsm", "IFGSM-20")):
            if got[k] is None:
                continue
            w(f"| {lab} | {pct(got[k])} | {pct(ref[k])} | {got[k] - ref[k]:+.2f} pp |")
        w("")
        w("Differences to expect: the JPEG-re-encoded copy (if used) shifts pixel values; 10% of "
          "the training images are held out for validation; the reference checkpoint was selected "
          "on the test set, ours is the last epoch; the reference IFGSM step size is not certain.")
    else:
        w("The comparison of the float En1ResNet20 row with the EnResNet reference (77.21% clean, "
          "55.35% FGSM, 49.06% IFGSM-20 on CIFAR-10) needs the full setting (`--full`: ResNet20 "
          "width 16, PGD-10 training, 200 epochs, all training images, 10,000 test images) and is "
          "**not made** here: at this scale the absolute accuracies are far below the reference "
          "by construction, and the difference would say nothing about the implementation.")
    w("")
    w("## What this scale can and cannot show")
    w("")
    if full:
        w("- This is the paper's training setting; one training seed per row, so differences "
          "between rows of about a point are within training noise.")
    else:
        w(f"- The models are small and briefly trained ({scale.epochs} epochs on {ntr} images, "
          f"PGD-{scale.attack_steps}), so absolute accuracies are far below the paper's; only "
          "comparisons between rows trained identically here are meaningful, and even those can "
          "change with the budget (e.g. binary rows may not have converged).")
        w(f"- Each row is one training run; the ± is test-time noise over {len(meta['seeds'])} "
          f"seeds on {nte} test images. The sampling error of an accuracy on {nte} images alone is "
          f"about ±{100 * math.sqrt(0.25 / max(1, nte)):.1f} pp, and the training-seed spread is "
          "not measured: treat differences of a couple of points as noise.")
        w("- The group-penalty strength is tied to this schedule (fixed total shrinkage); the "
          "same lambda_g would act very differently in a 200-epoch run.")
    w("- Sparsity of the ternary rule is partly by construction: the 0.7 mean|w| threshold "
      "zeros about 40% of normally distributed weights, and 4-bit zeros entries below max|w|/15.")
    w("- Claim (c) depends on our reconstruction of the trade-off loss (the paper's equation was "
      "not available; docs/training.md) and on one alpha and one lambda_g.")
    w("- White-box attacks on a stochastic model without EOT can overstate robustness; the "
      "transfer column bounds this from one side only.")
    w("")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m search.report", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULT_SCALE
    p.add_argument("--full", action="store_true",
                   help="the paper setting: ResNet20 width 16, PGD-10 training, 200 epochs, all "
                        "training images, 10,000 test images, IFGSM-20 as well (for a GPU)")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument("--subset-train", type=int, help=f"training images drawn (default {d.subset_train}; 0 = all)")
    p.add_argument("--subset-test", type=int, help=f"test images (default {d.subset_test}; 0 = all)")
    p.add_argument("--width", type=int, help=f"base width (default {d.width})")
    p.add_argument("--depth", type=int, help=f"depth 6n+2 (default {d.depth})")
    p.add_argument("--attack-steps", type=int, help=f"PGD steps of the training attack (default {d.attack_steps})")
    p.add_argument("--eval-steps", type=int, help=f"PGD/CW steps of the evaluation attacks (default {d.eval_steps})")
    p.add_argument("--eval-seeds", type=int, help=f"number of test-time noise seeds (default {d.eval_seeds})")
    p.add_argument("--batch-size", type=int, help=f"training batch (default {d.batch_size})")
    p.add_argument("--ifgsm", action="store_true", help="also report IFGSM (always on with --full)")
    p.add_argument("--alpha", type=float, help=f"natural-term weight of `mix` (default {ALPHA})")
    p.add_argument("--group-shrink", type=float, default=GROUP_SHRINK,
                   help=f"total proximal shrinkage lambda_g * sum_t lr_t of the mix rows; lambda_g "
                        f"follows from the run's schedule (default {GROUP_SHRINK})")
    p.add_argument("--group-lasso", type=float, help="lambda_g of the mix rows, overriding --group-shrink")
    p.add_argument("--rows", help="comma-separated subset of rows: " + ", ".join(ROWS))
    p.add_argument("--out", default="docs/findings.md", help="markdown report (default docs/findings.md)")
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
    for name in ("subset_train", "subset_test"):
        v = getattr(a, name)
        if v is not None:
            if v < 0:
                raise ConfigError(f"--{name.replace('_', '-')}={v}; accepted: an integer >= 0 (0 = all)")
            setattr(s, name, v or None)
    if a.ifgsm:
        s.ifgsm = True
    return s


def cache_key(spec: RowSpec, cfg: TrainConfig, scale: Scale, seeds: list[int], data_desc: str) -> str:
    blob = json.dumps({"row": dataclasses.asdict(spec), "cfg": cfg.to_flat(),
                       "scale": dataclasses.asdict(scale), "seeds": seeds, "data": data_desc},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    log: Callable[[str], None] = (lambda s: None) if args.quiet else _log_stderr
    t_start = time.perf_counter()
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
        dataset, data_desc = resolve_dataset(args)
        base = TrainConfig(
            dataset=dataset, data_root=args.data_root, download=args.download,
            subset_train=scale.subset_train, subset_test=scale.subset_test,
            val_fraction=scale.val_fraction, depth=scale.depth, width=scale.width,
            epochs=scale.epochs, batch_size=scale.batch_size, alpha=alpha,
            group_mode="prox", group_axis="out", seed=args.seed, device=args.device, cw=True,
        )
        base.quant.bits = 32
        base.train_attack = AttackConfig("pgd", EPS, 2.5 * EPS / scale.attack_steps,
                                         scale.attack_steps, True)
        base.validate()
        check_available(base)
    except ConfigError as e:
        fail(str(e))
    seeds = [1000 + i for i in range(scale.eval_seeds)]
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
        key = cache_key(spec, cfg, scale, seeds, data_desc)
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
                                     initializer=_worker_init, initargs=(args.threads,)) as pool:
                futs = {}
                for spec, cfg in todo:
                    log(f"[{spec.id}] queued: {spec.precision}, {spec.loss_label}, En{spec.ensemble}")
                    futs[pool.submit(_row_job, spec, cfg, scale, seeds, source_of(spec),
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
                finish(spec, cfg, *run_row(spec, cfg, data, scale, seeds, source_of(spec), log))

    command = "python -m search.report" + ("" if not argv else " " + shlex.join(argv))
    meta = {
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "git": sha,
        "machine": machine(),
        "wall_s": time.perf_counter() - t_start,
        "train_s": sum(r["train_s"] for r in R.values()),
        "eval_s": sum(r["eval_s"] for r in R.values()),
        "data": data_desc,
        "n_train": n_train, "n_val": len(data.val), "n_test": len(data.test),
        "augment": data.augment,
        "train_step": base.train_attack.step,
        "group_lasso": group_lasso, "group_shrink": group_lasso * slr,
        "sum_lr": slr, "steps": steps,
        "seeds": seeds, "alpha": alpha, "jobs": args.jobs, "threads": args.threads,
    }
    full = args.full and dataclasses.replace(scale, eval_seeds=FULL_SCALE.eval_seeds) == FULL_SCALE
    text = render(meta, R, rows, scale, full)
    atomic_write_text(text, args.out)
    if args.json:
        atomic_write_text(json.dumps({"meta": meta, "scale": dataclasses.asdict(scale), "rows": R},
                                     indent=1) + "\n", args.json)
    log(f"wrote {args.out} ({meta['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
