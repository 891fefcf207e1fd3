"""What the report runs: its scales, its grid of rows and the training/attack configs of a row."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from trainables.config import STEP_PER_EPS, AttackConfig, ConfigError, TrainConfig, dataset_eps
from trainables.robust_eval import StrongEvalConfig

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository into its own folder with shared/ beside it
SHARED_CIFAR = REPO.parent / "shared/data/cifar10-jpeg.tar.gz"
DEFAULT_CACHE = Path("~/.cache/brsearch")
EPS = dataset_eps("cifar10")  # 8/255; a --dataset run uses its own (trainables.config.dataset_eps)
EVAL_STEP = EPS * STEP_PER_EPS  # 2/255

# EnResNet poster, CIFAR-10, PGD-10 adversarial training (docs: algorithms.md section 4.1)
REFERENCE_EN1 = {"clean": 77.21, "fgsm": 55.35, "ifgsm": 49.06}


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
    strong_subset: int | None = None  # test images the strong suite runs on (None: all of them)


# Sized from measurements on 2 CPU cores (docs/findings.md, "Scale"): ResNet20 at width 8 costs
# ~13 ms per image for a PGD-3 training step and ~2.5 ms per image for an attack step on one
# thread, so this grid with 1,000 test images took 32 min of two otherwise idle cores before the
# strong suite; the suite costs ~0.8 s per image and row there (docs/training.md), so it runs on
# the first 500 test images: about half an hour more.
DEFAULT_SCALE = Scale(subset_train=2000, subset_test=1000, width=8, depth=20, epochs=8,
                      attack_steps=3, batch_size=32, strong_subset=500)
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


def is_source(spec: RowSpec) -> bool:
    """Float En1 rows: the models the transfer attack is crafted on."""
    return spec.bits == 32 and spec.ensemble == 1


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


def eval_attacks(scale: Scale, eps: float = EPS) -> dict[str, AttackConfig | None]:
    """The attacks run once per evaluation seed (the strong suite runs once per row)."""
    step = eps * STEP_PER_EPS
    atk: dict[str, AttackConfig | None] = {
        "clean": None,
        "fgsm": AttackConfig("fgsm", eps, eps, 1, False),
        "pgd": AttackConfig("pgd", eps, step, scale.eval_steps, True),
        "cw": AttackConfig("cw", eps, step, scale.eval_steps, True),
    }
    if scale.ifgsm:
        atk["ifgsm"] = AttackConfig("pgd", eps, step, scale.eval_steps, False)
    return atk


def strong_config(scale: Scale, overrides: dict | None = None, seed: int = 1000, eps: float = EPS) -> StrongEvalConfig:
    """The strong suite at the report's eps and PGD settings (the flags compare against PGD-k)."""
    cfg = StrongEvalConfig(eps=eps, pgd_steps=scale.eval_steps, pgd_step=eps * STEP_PER_EPS, seed=seed)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})
    cfg.validate()
    return cfg
