"""Strong robustness evaluation of a trained, randomized model: AutoAttack's `rand` protocol,
Square, EOT-PGD, and the sanity battery of Carlini et al. 2019 ("On Evaluating Adversarial
Robustness").

Why: EnResNet draws fresh noise in every forward pass, so a single-draw PGD overstates its
robustness, and quantized networks are a classic source of obfuscated gradients. AutoAttack's
authors evaluate randomized defenses with APGD-CE + APGD-DLR, each gradient averaged over 20
noise draws (EOT); we take that from torchattacks (docs/training.md says why that library) rather
than re-implementing it. Square needs no gradient at all, so a model whose white-box accuracy is
above its Square accuracy hides its gradients. The sanity battery turns the usual symptoms of a
broken evaluation into named flags (True = tripped), each with a tolerance from the sampling
error of the accuracies compared.

Everything runs batched on the model's device, in eval mode, seeded (without disturbing the
caller's RNG streams), and, given the Binary-Relax handle, on the fully quantized weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import pgd
from .config import ConfigError

FLAGS = ("flag_steps", "flag_eps", "flag_large_eps", "flag_blackbox", "flag_transfer", "flag_eot")
FLAG_HELP = {
    "flag_steps": "accuracy rises with more PGD steps",
    "flag_eps": "accuracy rises with a larger eps",
    "flag_large_eps": "accuracy at a very large eps is not near 0",
    "flag_blackbox": "best white-box attack is weaker than the gradient-free Square",
    "flag_transfer": "best white-box attack is weaker than a transfer attack",
    "flag_eot": "EOT-PGD is weaker than single-draw PGD",
}


@dataclass
class StrongEvalConfig:
    """Attack settings of the strong suite. Defaults and their reasons: docs/training.md,
    "Strong evaluation"."""

    eps: float = 8 / 255
    pgd_steps: int = 20  # the front's PGD-20, repeated here as the reference the flags compare to
    pgd_step: float = 2 / 255
    aa: bool = True
    aa_steps: int = 10  # torchattacks' AutoAttack('rand') default; the reference code uses 100
    aa_eot: int = 20  # noise draws per gradient, the AutoAttack `rand` setting
    aa_restarts: int = 1
    square: bool = True
    square_queries: int = 1000  # AutoAttack 'standard' uses 5000; fewer only weakens the check
    square_p_init: float = 0.8
    eot_pgd: bool = True
    eot_steps: int = 20
    eot_samples: int = 10  # noise draws averaged per gradient (one batched forward)
    sanity: bool = True
    sanity_steps: tuple[int, ...] = (1, 5)  # PGD at these steps (and pgd_steps), same step size
    sanity_eps_factors: tuple[float, ...] = (0.5, 2.0)  # PGD-pgd_steps at these multiples of eps
    large_eps: float = 0.5  # half the pixel range: any image can be moved to mid-grey
    near_zero: float = 0.05  # the large-eps accuracy must be at most this
    z: float = 2.0  # tolerance = z standard errors of the difference of two accuracies
    batch_size: int = 128
    seed: int = 0

    def validate(self) -> None:
        for k in ("pgd_steps", "aa_steps", "aa_eot", "aa_restarts", "square_queries", "eot_steps",
                  "eot_samples", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k}={v!r}; accepted: an integer >= 1")
        for k in ("eps", "pgd_step", "large_eps"):
            v = getattr(self, k)
            if not 0 < v <= 1:
                raise ConfigError(f"{k}={v!r}; accepted: a number in (0, 1] (inputs live in [0, 1])")
        if not 0 < self.square_p_init <= 1:
            raise ConfigError(f"square_p_init={self.square_p_init!r}; accepted: a number in (0, 1]")
        if not 0 <= self.near_zero < 1 or not self.z >= 0:
            raise ConfigError(f"near_zero={self.near_zero!r}, z={self.z!r}; accepted: near_zero in [0, 1), z >= 0")
        if any(s < 1 for s in self.sanity_steps) or any(f <= 0 for f in self.sanity_eps_factors):
            raise ConfigError(f"sanity_steps={self.sanity_steps}, sanity_eps_factors={self.sanity_eps_factors}; "
                              "accepted: integers >= 1 and factors > 0")


# --- attacks -------------------------------------------------------------------------------------


def eot_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
            samples: int, random_start: bool = True, only_correct: bool = True) -> torch.Tensor:
    """PGD whose every gradient is averaged over `samples` noise draws (expectation over
    transformation). The draws are one batched forward of `samples` copies: the model's noise is
    independent per element, and its batch-wide std is the same for identical copies.

    only_correct: attack only the points one clean forward classifies correctly and return the
    rest unchanged, as APGD and Square do (AutoAttack's convention); it saves the attack on points
    that are already lost."""
    x = x.detach()
    if only_correct:
        with torch.no_grad():
            keep = model(x).argmax(1) == y
        out = x.clone()
        if keep.any():
            out[keep] = eot_pgd(model, x[keep], y[keep], eps, step, steps, samples, random_start, False)
        return out
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0, 1) if random_start else x.clone()
    yr = y.repeat(samples)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv.repeat(samples, *([1] * (x.dim() - 1))))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, yr, reduction="sum"), x_adv)
        with torch.no_grad():
            x_adv = x_adv + step * g.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def autoattack_rand(model: nn.Module, cfg: StrongEvalConfig):
    """AutoAttack's randomized-defense protocol from torchattacks: APGD-CE then APGD-DLR (each on
    the points the previous one did not break), with EOT. With the defaults this is exactly the
    attack list of `torchattacks.AutoAttack(model, eps=eps, version='rand')` (a test checks it);
    building it here exposes steps and restarts."""
    import torchattacks

    kw = {"norm": "Linf", "eps": cfg.eps, "steps": cfg.aa_steps, "n_restarts": cfg.aa_restarts,
          "eot_iter": cfg.aa_eot, "seed": cfg.seed}
    return torchattacks.MultiAttack([torchattacks.APGD(model, loss="ce", **kw),
                                     torchattacks.APGD(model, loss="dlr", **kw)])


def square_attack(model: nn.Module, cfg: StrongEvalConfig):
    import torchattacks

    return torchattacks.Square(model, norm="Linf", eps=cfg.eps, n_queries=cfg.square_queries,
                               n_restarts=1, p_init=cfg.square_p_init, loss="margin", seed=cfg.seed)


def suite_attacks(model: nn.Module, cfg: StrongEvalConfig
                  ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> attack(x, y) for every attack the suite runs (the sanity variants included)."""
    e, s, k = cfg.eps, cfg.pgd_step, cfg.pgd_steps
    A: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "pgd": lambda x, y: pgd(model, x, y, e, s, k, True, "ce")}
    if cfg.eot_pgd:
        A["eot_pgd"] = lambda x, y: eot_pgd(model, x, y, e, s, cfg.eot_steps, cfg.eot_samples)
    if cfg.aa:
        aa = autoattack_rand(model, cfg)
        A["aa"] = lambda x, y: aa(x, y).detach()
    if cfg.square:
        sq = square_attack(model, cfg)
        A["square"] = lambda x, y: sq(x, y).detach()
    if cfg.sanity:
        def pgd_at(eps: float, step: float, steps: int, loss: str = "ce"):
            return lambda x, y: pgd(model, x, y, eps, step, steps, True, loss)

        for n in cfg.sanity_steps:
            if n != k:
                A[f"pgd_steps{n}"] = pgd_at(e, s, n)
        for f in cfg.sanity_eps_factors:
            if f != 1:
                A[f"pgd_eps{f:g}"] = pgd_at(min(1.0, e * f), s * f, k)
        A["large_eps"] = pgd_at(cfg.large_eps, 2.5 * cfg.large_eps / k, k, "cw")
    return A


# --- the suite -----------------------------------------------------------------------------------


def strong_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: StrongEvalConfig | None = None,
                br: Any = None, transfer_adv: torch.Tensor | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Accuracies (fractions of all images) under every attack of the suite, plus the sanity
    flags. `br`: the Binary-Relax handle of a model still in training form (evaluated through
    `br.quantized()`); None for a model that already holds its deployed weights (model.pt).
    `transfer_adv`: adversarial examples crafted on another model (enables flag_transfer)."""
    cfg = cfg or StrongEvalConfig()
    cfg.validate()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was = model.training
    model.eval()
    correct: dict[str, int] = {}
    seconds: dict[str, float] = {}
    quant = br.quantized() if br is not None else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quant:
            torch.manual_seed(cfg.seed)
            attacks = suite_attacks(model, cfg)
            for i in range(0, len(x), cfg.batch_size):
                xb, yb = x[i: i + cfg.batch_size], y[i: i + cfg.batch_size]
                batch = {"clean": xb}
                for name, atk in attacks.items():
                    t0 = time.perf_counter()
                    batch[name] = atk(xb, yb).to(device)
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                    model.eval()  # torchattacks restores the mode it found; keep eval regardless
                if transfer_adv is not None:
                    batch["transfer"] = transfer_adv[i: i + cfg.batch_size].to(device)
                with torch.no_grad():
                    for name, xa in batch.items():
                        correct[name] = correct.get(name, 0) + int((model(xa).argmax(1) == yb).sum())
                if log:
                    log(f"strong eval: {min(i + cfg.batch_size, len(x))}/{len(x)} images")
    finally:
        model.train(was)
    n = max(1, len(x))
    acc = {f"{k}_acc": c / n for k, c in correct.items()}
    out: dict[str, Any] = dict(acc)
    out.update(sanity_flags(acc, len(x), cfg))
    out["n_images"] = len(x)
    out["seconds"] = seconds  # per attack, summed over batches (what the docs' cost table uses)
    return out


def tolerance(a: float, b: float, n: int, z: float) -> float:
    """z standard errors of the difference of two accuracies on n images (treated as
    independent, which is conservative for attacks on the same images), and at least one image."""
    if n <= 0:
        return 0.0
    return max(z * math.sqrt((a * (1 - a) + b * (1 - b)) / n), 1.0 / n)


def sanity_flags(acc: dict[str, float], n: int, cfg: StrongEvalConfig) -> dict[str, Any]:
    """The Carlini et al. 2019 checks on measured accuracies (keys as `strong_eval` returns them).
    A flag is True when its check fails beyond the sampling tolerance, False when it passes and
    None when the attacks it needs were not run."""
    def worse(hi: str, lo: str) -> bool | None:  # True when acc[hi] > acc[lo] beyond noise
        if hi not in acc or lo not in acc:
            return None
        return acc[hi] > acc[lo] + tolerance(acc[hi], acc[lo], n, cfg.z)

    def chain(keys: list[str]) -> bool | None:
        keys = [k for k in keys if k in acc]
        if len(keys) < 2:
            return None
        return any(worse(b, a) for a, b in itertools.pairwise(keys))

    k = cfg.pgd_steps
    steps = sorted({*cfg.sanity_steps, k})
    factors = sorted({*cfg.sanity_eps_factors, 1.0})
    f: dict[str, Any] = {
        "flag_steps": chain(["pgd_acc" if s == k else f"pgd_steps{s}_acc" for s in steps]),
        "flag_eps": chain(["pgd_acc" if e == 1 else f"pgd_eps{e:g}_acc" for e in factors]),
        "flag_large_eps": None if "large_eps_acc" not in acc else acc["large_eps_acc"] > cfg.near_zero,
    }
    white = [k2 for k2 in ("pgd_acc", "eot_pgd_acc", "aa_acc") if k2 in acc]
    best = min(white, key=lambda k2: acc[k2]) if white else None
    f["flag_blackbox"] = worse(best, "square_acc") if best else None
    f["flag_transfer"] = worse(best, "transfer_acc") if best else None
    f["flag_eot"] = worse("eot_pgd_acc", "pgd_acc")
    f["sanity_flags"] = ",".join(name for name in FLAGS if f[name])
    return f


def config_from_flat(d: dict[str, Any]) -> StrongEvalConfig:
    """A config from flat keys (CLI flags), ignoring unknown keys."""
    names = {fld.name for fld in dataclasses.fields(StrongEvalConfig)}
    return StrongEvalConfig(**{k: v for k, v in d.items() if k in names and v is not None})
