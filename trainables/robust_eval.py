"""Strong robustness evaluation of a trained, randomized model: AutoAttack's `rand` protocol,
Square, EOT-PGD, and the sanity battery of Carlini et al. 2019 ("On Evaluating Adversarial
Robustness").

Why: EnResNet draws fresh noise in every forward pass, so a single-draw PGD overstates its
robustness, and quantized networks are a classic source of obfuscated gradients.

One scoring, on the same images, for clean and every attack (docs/training.md, "Strong
evaluation"):

* A randomized model is scored per point by its expected correctness: the fraction of
  `score_draws` noise draws (K, default 20) that classify the point correctly. Every image scored
  for one batch sees the same K noise seeds (common random numbers), so an image scored twice
  gets the same score, and the difference of two scores is the effect of the images alone.
* An attack hands back candidates, never the untouched input: its final or strongest iterates
  (APGD's best-loss and last-misclassified iterates, Square's best query, EOT-PGD's final and
  best-loss iterates). Its raw score of a point is the lowest score of its candidates.
* An attack's robust score of a point is min(clean score, raw score): a point counts robust only
  as far as it is clean-correct, so robust <= clean per point, by construction. The worst case
  (`worst_acc`) is the per-point minimum over clean and every attack at the suite's eps, so it is
  <= every single attack, by construction.

AutoAttack-rand (APGD-CE then APGD-DLR, 100 iterations, EOT 20, 1 restart) runs torchattacks'
own APGD iteration (`APGD.attack_single_run`); what this module replaces is its acceptance: the
library attacks only the points one clean forward (one noise draw) gets right and hands back the
clean image for every point it did not break in one draw. Here APGD-CE runs on every point, and
APGD-DLR on every point CE left with a nonzero score. Fewer iterations or draws are reported as
`apgd_acc` ("APGD-CE+DLR"), never as AutoAttack-rand. Square (torchattacks' random search) runs
against the expected logits (the mean of `square_draws` draws), so its accept/reject steps follow
the model's expected margin and not one draw's noise.

The sanity battery (trainables.sanity) compares the attacks on the same images with paired tests.

Everything runs batched on the model's device, in eval mode, seeded (without disturbing the
caller's RNG streams), and, given the Binary-Relax handle, on the fully quantized weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import pgd
from .config import STEP_PER_EPS, ConfigError
from .contract import CLEAN_ACC
from .metrics import expected_correct
from .models import noise
from .sanity import at_eps, sanity_flags

# The published AutoAttack `rand` protocol (Croce and Hein 2020, randomized defenses).
AA_PROTOCOL = {"aa_steps": 100, "aa_eot": 20, "aa_restarts": 1}


@dataclass
class StrongEvalConfig:
    """Attack settings of the strong suite. Defaults and their reasons: docs/training.md,
    "Strong evaluation". `eps` is the caller's threat model (trainables.config.dataset_eps or the
    trial's own evaluation eps); `pgd_step` None means eps / 4."""

    eps: float = 8 / 255
    pgd_steps: int = 20  # the front's PGD-20, repeated here as the reference the flags compare to
    pgd_step: float | None = None
    pgd_random_start: bool = True  # of PGD-k and its step and eps variants (search.evaluate: the trial's)
    aa: bool = True
    aa_steps: int = AA_PROTOCOL["aa_steps"]
    aa_eot: int = AA_PROTOCOL["aa_eot"]  # noise draws per gradient
    aa_restarts: int = AA_PROTOCOL["aa_restarts"]
    square: bool = True
    square_queries: int = 1000  # AutoAttack 'standard' uses 5000; fewer only weakens the check
    square_p_init: float = 0.8
    square_draws: int = 0  # 0: Square queries the noise-free model; n: the mean logits of n draws
    eot_pgd: bool = True
    eot_steps: int = 20
    eot_samples: int = 10  # noise draws averaged per gradient (one batched forward)
    score_draws: int = 20  # K: noise draws each image is scored with
    sanity: bool = True
    sanity_steps: tuple[int, ...] = (1, 5)  # PGD at these steps (and pgd_steps), same step size
    sanity_eps_factors: tuple[float, ...] = (0.5, 2.0)  # PGD-pgd_steps at these multiples of eps
    large_eps: float = 0.5  # half the pixel range: any image can be moved to mid-grey
    near_zero: float = 0.05  # the large-eps accuracy must be at most this
    alpha: float = 0.001  # level of each paired test (about 0.01 over the battery's comparisons)
    batch_size: int = 128
    seed: int = 0

    @property
    def step(self) -> float:
        return self.eps * STEP_PER_EPS if self.pgd_step is None else self.pgd_step

    @property
    def aa_name(self) -> str:
        """'aa' (AutoAttack-rand) with the published settings, 'apgd' with any other."""
        return "aa" if all(getattr(self, k) == v for k, v in AA_PROTOCOL.items()) else "apgd"

    def validate(self) -> None:
        for k in ("pgd_steps", "aa_steps", "aa_eot", "aa_restarts", "square_queries", "eot_steps",
                  "eot_samples", "score_draws", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k}={v!r}; accepted: an integer >= 1")
        for k in ("eps", "large_eps"):
            v = getattr(self, k)
            if not 0 < v <= 1:
                raise ConfigError(f"{k}={v!r}; accepted: a number in (0, 1] (inputs live in [0, 1])")
        if self.pgd_step is not None and not 0 < self.pgd_step <= 1:
            raise ConfigError(f"pgd_step={self.pgd_step!r}; accepted: a number in (0, 1] or None (eps / 4)")
        if not 0 < self.square_p_init <= 1:
            raise ConfigError(f"square_p_init={self.square_p_init!r}; accepted: a number in (0, 1]")
        if not 0 <= self.near_zero < 1 or not 0 < self.alpha < 1:
            raise ConfigError(f"near_zero={self.near_zero!r}, alpha={self.alpha!r}; accepted: near_zero in [0, 1), "
                              "alpha in (0, 1)")
        if any(s < 1 for s in self.sanity_steps) or any(f <= 0 for f in self.sanity_eps_factors):
            raise ConfigError(f"sanity_steps={self.sanity_steps}, sanity_eps_factors={self.sanity_eps_factors}; "
                              "accepted: integers >= 1 and factors > 0")


# --- scoring -------------------------------------------------------------------------------------


# --- attacks -------------------------------------------------------------------------------------
# Each attack maps (x, y) to a list of candidate images in the eps-ball; the scorer keeps, per
# point, the candidate the model does worst on.

Attack = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


def eot_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
            samples: int, random_start: bool = True) -> list[torch.Tensor]:
    """PGD whose every gradient is averaged over `samples` noise draws (expectation over
    transformation), on every point. The draws are one batched forward of `samples` copies.
    Returns [final iterate, the iterate of highest mean loss]."""
    x = x.detach()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0, 1) if random_start else x.clone()
    best, best_loss = x_adv.clone(), torch.full((len(x),), -float("inf"), device=x.device)
    yr = y.repeat(samples)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv.repeat(samples, *([1] * (x.dim() - 1))))
        per = F.cross_entropy(logits, yr, reduction="none")
        (g,) = torch.autograd.grad(per.sum(), x_adv)
        with torch.no_grad():
            mean = per.view(samples, len(x)).mean(0)
            better = mean > best_loss
            best[better], best_loss[better] = x_adv[better].detach(), mean[better]
            x_adv = x_adv + step * g.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return [x_adv.detach(), best]


class MeanLogits(nn.Module):
    """The logits averaged over `draws` noise draws (one batched forward): what Square queries,
    so that its accept/reject steps follow the expected margin rather than one draw's noise."""

    def __init__(self, model: nn.Module, draws: int) -> None:
        super().__init__()
        self.model, self.draws = model, draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.draws <= 1:
            return self.model(x)
        out = self.model(x.repeat(self.draws, *([1] * (x.dim() - 1))))
        return out.view(self.draws, len(x), -1).mean(0)


def apgd(model: nn.Module, cfg: StrongEvalConfig, loss: str):
    """torchattacks' APGD (its iteration, step-size schedule and EOT), used through
    `attack_single_run` only: see `aa_attack`."""
    import torchattacks

    return torchattacks.APGD(model, norm="Linf", eps=cfg.eps, steps=cfg.aa_steps, n_restarts=1,
                             eot_iter=cfg.aa_eot, seed=cfg.seed, loss=loss)


def square_attack(model: nn.Module, cfg: StrongEvalConfig):
    import torchattacks

    return torchattacks.Square(MeanLogits(model, cfg.square_draws), norm="Linf", eps=cfg.eps,
                               n_queries=cfg.square_queries, n_restarts=1, p_init=cfg.square_p_init,
                               loss="margin", seed=cfg.seed)


def suite_attacks(model: nn.Module, cfg: StrongEvalConfig) -> dict[str, Attack]:
    """name -> attack(x, y) -> candidates, for every attack the suite runs except AutoAttack-rand
    (whose DLR stage depends on the CE stage's scores: `aa_attack`)."""
    e, s, k = cfg.eps, cfg.step, cfg.pgd_steps
    rs = cfg.pgd_random_start
    A: dict[str, Attack] = {"pgd": lambda x, y: [pgd(model, x, y, e, s, k, rs, "ce")]}
    if cfg.eot_pgd:
        A["eot_pgd"] = lambda x, y: eot_pgd(model, x, y, e, s, cfg.eot_steps, cfg.eot_samples)
    if cfg.square:
        sq = square_attack(model, cfg)

        def square(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
            sq.init_hyperparam(x)
            with noise(model, on=cfg.square_draws != 0):  # 0: the noise-free model
                return [sq.attack_single_run(x, y)[1].detach()]

        A["square"] = square
    if cfg.sanity:
        def pgd_at(eps: float, step: float, steps: int, loss: str = "ce", start: bool = rs) -> Attack:
            return lambda x, y: [pgd(model, x, y, eps, step, steps, start, loss)]

        for n in cfg.sanity_steps:
            if n != k:
                A[f"pgd_steps{n}"] = pgd_at(e, s, n)
        for f in cfg.sanity_eps_factors:
            if f != 1:
                A[f"pgd_eps{f:g}"] = pgd_at(min(1.0, e * f), s * f, k)
        A["large_eps"] = pgd_at(cfg.large_eps, 2.5 * cfg.large_eps / k, k, "cw", True)
    return A


def aa_attack(model: nn.Module, cfg: StrongEvalConfig, score: Callable[[list[torch.Tensor]], torch.Tensor],
              keep: list[tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """AutoAttack-rand with one scoring: per restart, APGD-CE on every point, then APGD-DLR on
    the points CE left with a nonzero score. Each run contributes its best-loss and its last
    misclassified iterate (its random start when none was) as candidates. Returns the raw
    per-point score (`score` of the candidates, its minimum). `keep` collects (indices,
    candidate) of every run, for inspection."""
    ce, dlr = apgd(model, cfg, "ce"), apgd(model, cfg, "dlr")

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raw = torch.ones(len(y), device=x.device)
        for _ in range(cfg.aa_restarts):
            for atk in (ce, dlr):
                todo = (raw > 0).nonzero().flatten()
                if len(todo) == 0:
                    break
                best, _, _, best_adv = atk.attack_single_run(x[todo], y[todo])
                cand = [x.clone(), x.clone()]
                cand[0][todo], cand[1][todo] = best.detach(), best_adv.detach()
                if keep is not None:
                    keep.extend([(todo, best.detach()), (todo, best_adv.detach())])
                s = score(cand)
                raw[todo] = torch.minimum(raw[todo], s[todo])
        return raw

    return run


# --- the suite -----------------------------------------------------------------------------------


def strong_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: StrongEvalConfig | None = None,
                br: Any = None, transfer_adv: torch.Tensor | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Accuracies (mean per-point scores over all images) under every attack of the suite, the
    worst case, and the sanity flags. `<attack>_acc` is the robust accuracy (per point at most
    the clean score), `<attack>_raw_acc` the attack's images scored alone; `points` holds the
    per-point scores (name -> CPU tensor: `clean`, robust ones under the attack's name, raw ones
    under `<name>_raw`). `br`: the Binary-Relax handle of a model still in training form
    (evaluated through `br.quantized()`); None for a model that already holds its deployed
    weights (model.pt). `transfer_adv`: adversarial examples crafted on another model (enables
    flag_transfer)."""
    cfg = cfg or StrongEvalConfig()
    cfg.validate()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was = model.training
    model.eval()
    raw: dict[str, list[torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    quant = br.quantized() if br is not None else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quant:
            torch.manual_seed(cfg.seed)
            attacks = suite_attacks(model, cfg)
            for b, i in enumerate(range(0, len(x), cfg.batch_size)):
                xb, yb = x[i: i + cfg.batch_size], y[i: i + cfg.batch_size]
                seed = cfg.seed * 1_000_003 + b  # the batch's K noise seeds, the same for every candidate

                def score(cands: list[torch.Tensor], xb=xb, yb=yb, seed=seed) -> torch.Tensor:
                    for c in cands:  # every candidate stays in the box (the ball is each attack's)
                        assert c.shape == xb.shape and float(c.min()) >= 0 and float(c.max()) <= 1
                    return torch.stack([expected_correct(model, c, yb, cfg.score_draws, seed) for c in cands]).min(0).values

                got = {"clean": score([xb])}
                for name, atk in attacks.items():
                    t0 = time.perf_counter()
                    cands = atk(xb, yb)
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                    got[name] = score(cands)
                    model.eval()
                if cfg.aa:
                    t0 = time.perf_counter()
                    got[cfg.aa_name] = aa_attack(model, cfg, score)(xb, yb)
                    seconds[cfg.aa_name] = seconds.get(cfg.aa_name, 0.0) + time.perf_counter() - t0
                    model.eval()
                if transfer_adv is not None:
                    got["transfer"] = score([transfer_adv[i: i + cfg.batch_size].to(device)])
                for name, v in got.items():
                    raw.setdefault(name, []).append(v.cpu())
                if log:
                    log(f"strong eval: {min(i + cfg.batch_size, len(x))}/{len(x)} images")
    finally:
        model.train(was)
    return summarize({k: torch.cat(v) for k, v in raw.items()}, cfg, seconds)


def summarize(raw: dict[str, torch.Tensor], cfg: StrongEvalConfig, seconds: dict[str, float] | None = None
              ) -> dict[str, Any]:
    """Accuracies, worst case and flags from per-point raw scores (name -> tensor; `clean` and
    one per attack). The robust score of a point is min(clean, raw); the worst case the minimum
    over clean and every attack in the suite's eps-ball."""
    clean = raw["clean"]
    n = len(clean)
    pts: dict[str, torch.Tensor] = {"clean": clean}
    for name, r in raw.items():
        if name != "clean":
            pts[name] = torch.minimum(clean, r)
            pts[f"{name}_raw"] = r
    worst = clean.clone()
    for name in raw:
        if at_eps(name):
            worst = torch.minimum(worst, pts[name])
    pts["worst"] = worst
    mean = (lambda t: float(t.double().mean())) if n else (lambda t: 0.0)
    out: dict[str, Any] = {CLEAN_ACC: mean(clean)}
    for name in raw:
        if name != "clean":
            out[f"{name}_acc"] = mean(pts[name])
            out[f"{name}_raw_acc"] = mean(raw[name])
    out["worst_acc"] = mean(worst)
    out.update(sanity_flags(pts, cfg))
    out["n_images"] = n
    out["protocol"] = protocol(cfg)
    out["seconds"] = dict(seconds or {})  # per attack, summed over batches (what the docs' cost table uses)
    out["points"] = pts
    return out


def protocol(cfg: StrongEvalConfig) -> str:
    """One line naming what ran (the report and search.evaluate print it)."""
    aa = ("AutoAttack-rand (APGD-CE + APGD-DLR" if cfg.aa_name == "aa" else "APGD-CE + APGD-DLR (not AutoAttack-rand:")
    return (f"{aa} {cfg.aa_steps} iterations, EOT {cfg.aa_eot}, {cfg.aa_restarts} restart(s)); "
            f"eps {cfg.eps:.4g}; scored by expected correctness over {cfg.score_draws} noise draws, "
            f"robust = clean-correct and not broken")


def config_from_flat(d: dict[str, Any]) -> StrongEvalConfig:
    """A config from flat keys (CLI flags), ignoring unknown keys."""
    names = {fld.name for fld in dataclasses.fields(StrongEvalConfig)}
    return StrongEvalConfig(**{k: v for k, v in d.items() if k in names and v is not None})
