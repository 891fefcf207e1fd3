"""One dataclass describes a training run; every entry point (CLI, Ray Tune, report) builds it.

Validation lives here so the CLI, the search-space checker and the Tune trainable reject the
same bad values with the same one-line message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
LOSSES = ("madry", "mix", "trades")
ATTACKS = ("fgsm", "pgd", "cw", "trades")
TERNARY_MODES = ("twn0.7", "exact")
LAMBDA_SCHEDULES = ("final", "rho")
ATTACK_BN_MODES = ("auto", "train", "eval")
GROUP_AXES = ("out", "in")
GROUP_MODES = ("penalty", "prox")
PRECISIONS = ("fp32", "bf16", "fp16")
LATENCY_MODES = ("end", "every", "off")
BUILTIN_DATASETS = ("digits", "cifar10", "mnist", "fashion-mnist", "svhn")

# The threat model: the default L-inf budget per dataset, on inputs in [0, 1]. The literature's
# choices: MNIST 0.3 (Madry et al. 2018), Fashion-MNIST 0.1, CIFAR-10 and SVHN 8/255. Digits
# (scikit-learn's 8x8 images) has 17 grey levels, 1/16 apart: 8/255 is half a level, a budget no
# rounding of the pixels would even see, so it takes 0.1 (1.6 levels), the low end of the
# MNIST family's range; a 3-epoch model still keeps about half its accuracy there (PGD-20 0.55
# against 0.75 at 8/255 and 0.16 at 0.2). Images from a folder are natural images: 8/255.
# docs/training.md, "Threat model".
DATASET_EPS = {"digits": 0.1, "mnist": 0.3, "fashion-mnist": 0.1, "cifar10": 8 / 255, "svhn": 8 / 255}
FOLDER_EPS = 8 / 255
STEP_PER_EPS = 0.25  # PGD step = eps / 4 unless set (2/255 at 8/255, the usual CIFAR setting)


def dataset_eps(name: str) -> float:
    """The default attack budget of a dataset (DATASET_EPS; FOLDER_EPS for folder:PATH)."""
    return DATASET_EPS.get(name, FOLDER_EPS)


class ConfigError(ValueError):
    """A bad user-supplied value. Its message is one line naming the value and what is accepted."""


def check_dataset(name: str) -> None:
    if name in BUILTIN_DATASETS:
        return
    if name.startswith("folder:") and len(name) > len("folder:"):
        return
    raise ConfigError(
        f"unknown dataset {name!r}; accepted: {', '.join(BUILTIN_DATASETS)} or folder:PATH"
    )


@dataclass
class QuantConfig:
    """Binary-Relax settings: what to quantize, to how many bits, and the relaxation schedule."""

    bits: int = 2
    ternary_mode: str = "twn0.7"  # reference 0.7*mean|w| rule, or the exact optimal projection
    lloyd_iters: int = 1  # b >= 3: refinement steps of (levels, scale); the reference uses one
    lambda0: float = 1.0  # relaxation weight before the first step's growth
    # "final": lambda grows geometrically per optimizer step from lambda0 to lambda_final at the
    # start of phase II, whatever the run length (relaxed weights end >= 99 % projection at 100).
    # "rho": the reference's per-epoch lambda0 * rho^(epoch+1), which only gets far in long runs.
    lambda_schedule: str = "final"
    lambda_final: float = 100.0
    rho: float = 1.05  # per-epoch growth, used by lambda_schedule="rho" only
    phase2_start: float = 0.75  # fraction of epochs after which weights are hard-quantized
    quantize_stem: bool = True
    quantize_shortcut: bool = False  # 1x1 projection shortcuts
    quantize_fc: bool = False  # the classifier

    def validate(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported; accepted: 1-8 or 32 (float)")
        if self.ternary_mode not in TERNARY_MODES:
            raise ConfigError(
                f"ternary_mode={self.ternary_mode!r}; accepted: {', '.join(TERNARY_MODES)}"
            )
        if self.lloyd_iters < 1:
            raise ConfigError(f"lloyd_iters={self.lloyd_iters}; accepted: an integer >= 1")
        if not self.lambda0 > 0:
            raise ConfigError(f"lambda0={self.lambda0}; accepted: a number > 0")
        if not self.rho >= 1:
            raise ConfigError(f"rho={self.rho}; accepted: a number >= 1")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ConfigError(
                f"lambda_schedule={self.lambda_schedule!r}; accepted: {', '.join(LAMBDA_SCHEDULES)}"
            )
        if self.lambda_schedule == "final" and not self.lambda_final >= self.lambda0:
            raise ConfigError(
                f"lambda_final={self.lambda_final}; accepted: a number >= lambda0 ({self.lambda0})"
            )
        if not 0.0 <= self.phase2_start <= 1.0:
            raise ConfigError(f"phase2_start={self.phase2_start}; accepted: a fraction in [0, 1]")


@dataclass
class AttackConfig:
    """An L-infinity attack; inputs live in [0, 1]."""

    kind: str = "pgd"
    eps: float | None = None  # None: the dataset's (dataset_eps), filled in by TrainConfig.validate
    step: float | None = None  # None: eps * STEP_PER_EPS
    steps: int = 10
    random_start: bool = True

    def resolve(self, dataset: str) -> None:
        """Fill an unset eps with the dataset's default and an unset step with eps / 4."""
        if self.eps is None:
            self.eps = dataset_eps(dataset)
        if self.step is None:
            self.step = self.eps * STEP_PER_EPS

    def validate(self, what: str = "attack") -> None:
        if self.eps is None or self.step is None:
            raise ConfigError(f"{what} eps={self.eps}, step={self.step}; accepted: numbers >= 0 "
                              "(TrainConfig.validate fills unset ones from the dataset)")
        if self.kind not in ATTACKS:
            raise ConfigError(f"{what} {self.kind!r} is unknown; accepted: {', '.join(ATTACKS)}")
        if not self.eps >= 0:
            raise ConfigError(f"{what} eps={self.eps}; accepted: a number >= 0")
        if not self.step >= 0:
            raise ConfigError(f"{what} step={self.step}; accepted: a number >= 0")
        if self.steps < 1:
            raise ConfigError(f"{what} steps={self.steps}; accepted: an integer >= 1")


@dataclass
class TrainConfig:
    """Everything one trial needs. Field names are the search-space keys."""

    # data
    dataset: str = "digits"
    data_root: str = "./data"
    download: bool = False
    subset_train: int | None = None
    subset_test: int | None = None
    val_fraction: float = 0.2  # the objectives' split: 287 of digits' 1,437 training images
    augment: bool | None = None  # None: crop+flip for 32x32 colour images only
    # model
    depth: int = 8  # 6n+2; ResNet20 is depth 20
    width: int = 16
    ensemble: int = 1
    noise: float = 0.1
    # optimisation
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of epochs; lr x0.1 at each
    # loss
    loss: str = "mix"
    alpha: float = 0.2  # weight of the natural term in `mix`
    beta: float = 6.0  # weight of the KL term in `trades`
    group_lasso: float = 0.0
    group_axis: str = "out"
    group_mode: str = "penalty"
    # quantization and attacks
    quant: QuantConfig = field(default_factory=QuantConfig)
    train_attack: AttackConfig = field(default_factory=AttackConfig)
    eval_attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=20, random_start=False))
    # BatchNorm mode while the training attack runs: auto = train for madry/mix (EnResNet),
    # eval for trades (TRADES reference); see losses.py and docs/training.md
    attack_bn: str = "auto"
    proxy_eval_size: int = 256  # fixed validation subset for the cheap per-epoch robust proxy
    proxy_attack_steps: int = 3
    # phase I proxies: re-estimate BN statistics under the projected weights on this many
    # training batches (then restore the training buffers); 0 evaluates with the training ones
    proxy_bn_batches: int = 4
    cw: bool = True  # also run CW-Linf in the final evaluation
    # run
    seed: int = 0
    eval_seed: int = 1234
    # the final evaluation scores each point by its expected correctness over this many noise
    # draws (the strong suite's K; the per-epoch proxies use one draw): docs/training.md
    eval_draws: int = 20
    device: str = "auto"
    max_grad_norm: float | None = None
    # throughput (docs/gpu.md); none changes what is computed,
    # except precision, which changes the arithmetic of the forward/backward passes
    precision: str = "fp32"  # bf16 / fp16: autocast of the model's passes (projections stay fp32)
    channels_last: bool = False  # NHWC weights and batches (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the model: for GPUs; slower on a CPU (docs/benchmarks.md)
    deterministic: bool = False  # cuDNN deterministic algorithms, no autotuning (exact resume on CUDA)
    eval_batch_size: int = 256
    # deployment footprint (trainables.footprint): latency of the exported ONNX model in
    # onnxruntime, measured on the final report ("end"), on every report ("every": what a sweep
    # with latency_ms among its objectives sets, so MO-ASHA's rungs can rank on it) or never ("off")
    latency: str = "end"
    latency_threads: int = 1  # onnxruntime intra-op threads: one core, as on a small device
    latency_runs: int = 50  # timed batch-1 inferences (after 5 warm-up runs)

    def validate(self) -> None:
        """Check every value; first fill the attacks' unset eps and step from the dataset's
        threat model (`dataset_eps`), so every entry point resolves them the same way."""
        check_dataset(self.dataset)
        self.train_attack.resolve(self.dataset)
        self.eval_attack.resolve(self.dataset)
        self.quant.validate()
        self.train_attack.validate("training attack")
        self.eval_attack.validate("evaluation attack")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss {self.loss!r} is unknown; accepted: {', '.join(LOSSES)}")
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ConfigError(f"depth={self.depth}; accepted: 6n+2 with n >= 1 (8, 14, 20, 32, ...)")
        for name in ("width", "ensemble", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; accepted: an integer >= 1")
        for name in ("subset_train", "subset_test"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v}; accepted: an integer >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha}; accepted: a number in [0, 1]")
        if not self.beta >= 0:
            raise ConfigError(f"beta={self.beta}; accepted: a number >= 0")
        if not self.noise >= 0:
            raise ConfigError(f"noise={self.noise}; accepted: a number >= 0")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr}; accepted: a number > 0")
        if not self.group_lasso >= 0:
            raise ConfigError(f"group_lasso={self.group_lasso}; accepted: a number >= 0")
        if self.group_axis not in GROUP_AXES:
            raise ConfigError(f"group_axis={self.group_axis!r}; accepted: {', '.join(GROUP_AXES)}")
        if self.group_mode not in GROUP_MODES:
            raise ConfigError(f"group_mode={self.group_mode!r}; accepted: {', '.join(GROUP_MODES)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"val_fraction={self.val_fraction}; accepted: a fraction in (0, 1) (the objectives "
                f"are measured on the validation split, so it cannot be empty)"
            )
        if self.attack_bn not in ATTACK_BN_MODES:
            raise ConfigError(f"attack_bn={self.attack_bn!r}; accepted: {', '.join(ATTACK_BN_MODES)}")
        if self.proxy_bn_batches < 0:
            raise ConfigError(f"proxy_bn_batches={self.proxy_bn_batches}; accepted: an integer >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}; accepted: {', '.join(PRECISIONS)}")
        if self.eval_draws < 1:
            raise ConfigError(f"eval_draws={self.eval_draws}; accepted: an integer >= 1")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={self.eval_batch_size}; accepted: an integer >= 1")
        if self.latency not in LATENCY_MODES:
            raise ConfigError(f"latency={self.latency!r}; accepted: {', '.join(LATENCY_MODES)}")
        for name in ("latency_threads", "latency_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; accepted: an integer >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r}; accepted: auto, cpu, cuda, cuda:N")

    # --- flat dict view: search spaces, MLflow params and Tune configs use flat keys ---------
    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                for g in dataclasses.fields(v):
                    out[f"{f.name}.{g.name}"] = getattr(v, g.name)
            else:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrainConfig:
        """Build from flat keys. Short aliases (bits, lambda0, lambda_final, rho, phase2_start, eps, ...)
        map to nested fields so search spaces read naturally. Unknown keys are an error."""
        cfg = cls()
        for key, value in flat.items():
            set_field(cfg, key, value)
        return cfg


ALIASES = {
    "bits": "quant.bits",
    "ternary_mode": "quant.ternary_mode",
    "lloyd_iters": "quant.lloyd_iters",
    "lambda0": "quant.lambda0",
    "rho": "quant.rho",
    "lambda_final": "quant.lambda_final",
    "lambda_schedule": "quant.lambda_schedule",
    "phase2_start": "quant.phase2_start",
    "quantize_shortcut": "quant.quantize_shortcut",
    "quantize_fc": "quant.quantize_fc",
    "eps": "train_attack.eps",
    "eval_eps": "eval_attack.eps",
    "eval_step": "eval_attack.step",
    "attack_step": "train_attack.step",
    "attack_steps": "train_attack.steps",
}


def known_keys() -> list[str]:
    return sorted(set(TrainConfig().to_flat()) | set(ALIASES))


def set_field(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set a flat or dotted key on cfg, coercing to the field's type."""
    path = ALIASES.get(key, key)
    parts = path.split(".")
    target: Any = cfg
    for p in parts[:-1]:
        if not hasattr(target, p) or not dataclasses.is_dataclass(getattr(target, p)):
            raise ConfigError(f"unknown parameter {key!r}; accepted: {', '.join(known_keys())}")
        target = getattr(target, p)
    names = {f.name: f for f in dataclasses.fields(target)}
    if parts[-1] not in names:
        raise ConfigError(f"unknown parameter {key!r}; accepted: {', '.join(known_keys())}")
    current = getattr(target, parts[-1])
    if current is None:  # optional field: take the type from its annotation
        ann = str(names[parts[-1]].type)
        current = True if "bool" in ann else 0 if "int" in ann else 0.0 if "float" in ann else ""
    setattr(target, parts[-1], _coerce(key, value, current))


def _coerce(key: str, value: Any, current: Any) -> Any:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if isinstance(current, int) and not isinstance(current, bool):
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}={value!r} has the wrong type; accepted: {type(current).__name__}"
        ) from None
    return value
