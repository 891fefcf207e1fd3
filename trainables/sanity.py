"""The sanity battery of Carlini et al. 2019 ("On Evaluating Adversarial Robustness") on the
strong suite's per-point scores (trainables.robust_eval): each flag is a paired test between two
attacks on the same images, so a systematic gap trips it and sampling noise does not.

A flag compares attacks with McNemar's exact test (a one-sided exact binomial test on the
discordant points) on per-point outcomes, a point being right when the majority of its K draws
is. It trips when the attack that should be stronger scores higher on significantly more points
than the other (p < `alpha`).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .robust_eval import StrongEvalConfig

FLAGS = ("flag_above_clean", "flag_steps", "flag_eps", "flag_large_eps", "flag_blackbox", "flag_transfer",
         "flag_eot", "flag_aa")
FLAG_HELP = {
    "flag_above_clean": "an attack's images score higher than the clean ones",
    "flag_steps": "accuracy rises with more PGD steps",
    "flag_eps": "accuracy rises with a larger eps",
    "flag_large_eps": "accuracy at a very large eps is not near 0",
    "flag_blackbox": "the white-box attacks together are weaker than the gradient-free Square",
    "flag_transfer": "the white-box attacks together are weaker than a transfer attack",
    "flag_eot": "EOT-PGD is weaker than single-draw PGD",
    "flag_aa": "AutoAttack-rand (or APGD) is weaker than single-draw PGD",
}
WHITE_BOX = ("pgd", "eot_pgd", "aa", "apgd")


def paired_p(hi: torch.Tensor, lo: torch.Tensor) -> float:
    """One-sided p-value that `hi` is right on more points than `lo` beyond chance: McNemar's
    exact test (the exact binomial test on the discordant points) on per-point outcomes, a point
    counting as right when its score is above 1/2 (the majority vote of its K draws). Voting
    keeps a draw's noise (0.95 against 0.9) out of the discordant pairs; only flips count."""
    from scipy.stats import binom

    d = (hi > 0.5).int().cpu() - (lo > 0.5).int().cpu()
    up, down = int((d > 0).sum()), int((d < 0).sum())
    if up == 0:
        return 1.0
    return float(binom.sf(up - 1, up + down, 0.5))


def at_eps(name: str) -> bool:
    """Whether the attack `name` of the suite works in the suite's own eps-ball."""
    return name != "clean" and not name.startswith("pgd_eps") and name != "large_eps"


def sanity_flags(pts: dict[str, torch.Tensor], cfg: StrongEvalConfig) -> dict[str, Any]:
    """The Carlini et al. 2019 checks on per-point scores (`summarize`'s `pts`: robust scores under
    the attack's name, raw ones under `<name>_raw`). A flag is True when its paired test rejects
    at `cfg.alpha` (large_eps: when its accuracy is above `near_zero`), False when it passes and
    None when the attacks it needs were not run. `sanity_p` holds each flag's p-value."""
    p: dict[str, float | None] = {}

    def worse(hi: str, lo: str) -> float | None:  # p-value of "hi scores above lo"
        if hi not in pts or lo not in pts:
            return None
        return paired_p(pts[hi], pts[lo])

    def chain(keys: list[str]) -> float | None:
        keys = [k for k in keys if k in pts]
        if len(keys) < 2:
            return None
        return min(paired_p(pts[b], pts[a]) for a, b in itertools.pairwise(keys))

    k = cfg.pgd_steps
    raws = [n for n in pts if n.endswith("_raw") and at_eps(n[:-4])]
    p["flag_above_clean"] = min((paired_p(pts[n], pts["clean"]) for n in raws), default=None)
    p["flag_steps"] = chain(["pgd" if s == k else f"pgd_steps{s}" for s in sorted({*cfg.sanity_steps, k})])
    p["flag_eps"] = chain(["pgd" if e == 1 else f"pgd_eps{e:g}" for e in sorted({*cfg.sanity_eps_factors, 1.0})])
    white = [w for w in WHITE_BOX if w in pts]
    if white:
        pts["white"] = torch.stack([pts[w] for w in white]).min(0).values
    p["flag_blackbox"] = worse("white", "square") if white else None
    p["flag_transfer"] = worse("white", "transfer") if white else None
    p["flag_eot"] = worse("eot_pgd", "pgd")
    p["flag_aa"] = worse("aa", "pgd") if "aa" in pts else worse("apgd", "pgd")
    f: dict[str, Any] = {name: None if v is None else v < cfg.alpha for name, v in p.items()}
    large = pts.get("large_eps_raw")
    f["flag_large_eps"] = None if large is None else float(large.double().mean()) > cfg.near_zero
    pts.pop("white", None)
    f["sanity_flags"] = ",".join(name for name in FLAGS if f[name])
    f["sanity_p"] = {name: v for name, v in p.items() if v is not None}
    return f
