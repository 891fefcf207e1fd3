"""The rules that turn measured numbers into verdicts on the paper's claims, and the statistics
they use. Thresholds are in percentage points (pp) of accuracy or of sparsity."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainables.contract import CHANNEL_SPARSITY
from trainables.sanity import FLAG_HELP, FLAGS

SPARSE_MIN = 10.0  # (a) "sparse": at least this % of the quantized weights are exact zeros
UNSTRUCTURED_RATIO = 0.25  # (b) "far below": channel sparsity <= this fraction of weight sparsity
CLEAN_GAIN_MIN = 1.0  # (c) clean accuracy "raised": mix+group minus madry >= +1 pp
CHANNEL_GAIN_MIN = 5.0  # (c) channel sparsity "raised": >= +5 pp
FGSM_LOSS_MAX = 1.0  # (c) "no loss under FGSM": drop <= 1 pp
STRONG_LOSS_MAX = 3.0  # (c) "little loss under PGD-20, CW and AutoAttack-rand": drop <= 3 pp


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((v - m) ** 2 for v in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def m(res: dict, key: str) -> float:
    """Mean over seeds of a seeded attack ('clean', 'pgd', ...), or a strong-suite accuracy
    ('aa', 'square', 'eot_pgd'), in %."""
    if key in res["per_seed"]:
        return mean_sd(res["per_seed"][key])[0]
    return 100.0 * res["strong"][f"{key}_acc"]


def has(res: dict, key: str) -> bool:
    return key in res["per_seed"] or f"{key}_acc" in res.get("strong", {})


def pct(v: float) -> str:
    return f"{v:.1f}%"


def tripped(res: dict) -> list[str]:
    """The sanity flags a row tripped (names from trainables.sanity.FLAGS)."""
    s = res.get("strong", {})
    return [f for f in FLAGS if s.get(f)]


def flag_line(name: str) -> str:
    return f"`{name}` ({FLAG_HELP[name]})"


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


def _madry_rows(R: dict[str, dict], v: Verdict) -> list[str]:
    """The quantized madry rows present; none: the verdict says what it needs."""
    madry = [r for r in ("4bit-madry", "ternary-madry") if r in R]
    if not madry:
        v.lines.append("Needs the 4bit-madry and ternary-madry rows.")
    return madry


def verdict_a(R: dict[str, dict]) -> Verdict:
    claim = "(a) Ternary and 4-bit BR make the weights sparse."
    v = Verdict(claim, "not tested")
    rows = [r for r in ("4bit-madry", "ternary-madry", "4bit-mix", "ternary-mix") if r in R]
    madry = _madry_rows(R, v)
    if not madry:
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
    madry = _madry_rows(R, v)
    if not madry:
        return v
    ok = []
    for r in madry:
        s = R[r]["structure"]
        ws, cs, ci = (100 * s["weight_sparsity"], 100 * s[CHANNEL_SPARSITY],
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
             "sparsity, with no loss under FGSM and little under PGD-20, CW-Linf and AutoAttack-rand.")
    v = Verdict(claim, "not tested")
    results, ran = [], []
    for prec in ("float", "4bit", "ternary", "binary"):
        a, b = f"{prec}-madry", f"{prec}-mix"
        if a not in R or b not in R:
            continue
        ran.append(f"{prec}-madry/mix")
        A, B = R[a], R[b]
        keys = [k for k in ("clean", "fgsm", "pgd", "cw", "aa") if has(A, k) and has(B, k)]
        d = {k: m(B, k) - m(A, k) for k in keys}
        dch = 100 * (B["structure"][CHANNEL_SPARSITY] - A["structure"][CHANNEL_SPARSITY])
        parts = {"clean": d["clean"] >= CLEAN_GAIN_MIN, "channels": dch >= CHANNEL_GAIN_MIN,
                 "fgsm": d["fgsm"] >= -FGSM_LOSS_MAX, "pgd": d["pgd"] >= -STRONG_LOSS_MAX,
                 "cw": d["cw"] >= -STRONG_LOSS_MAX}
        if "aa" in d:
            parts["aa"] = d["aa"] >= -STRONG_LOSS_MAX
        results.append(all(parts.values()))
        failed = [k for k, ok in parts.items() if not ok]
        aa = f", AutoAttack-rand {d['aa']:+.1f} pp" if "aa" in d else ""
        v.lines.append(
            f"{prec}: mix+group minus madry: clean {d['clean']:+.1f} pp, zero filters {dch:+.1f} pp, "
            f"FGSM {d['fgsm']:+.1f} pp, PGD-20 {d['pgd']:+.1f} pp, CW-Linf {d['cw']:+.1f} pp{aa} -> "
            + ("all parts hold." if not failed else "fails on: " + ", ".join(failed) + ".")
        )
        for r in (a, b):
            if tripped(R[r]):
                v.lines.append(f"Caution: {r} trips {', '.join(tripped(R[r]))}; its robust accuracies "
                               "may be overstated (see the sanity battery).")
    if not results:
        v.lines.append("Needs matching madry and mix rows.")
        return v
    v.status = _status(results, ran, [f"{p}-madry/mix" for p in ("float", "4bit", "ternary", "binary")])
    v.lines.append(
        f"Rule (per bit width, mix with alpha={alpha:g} and lambda_g={group_lasso:.3g} against madry): "
        f"clean >= +{CLEAN_GAIN_MIN:g} pp, zero output filters >= +{CHANNEL_GAIN_MIN:g} pp, "
        f"FGSM >= -{FGSM_LOSS_MAX:g} pp, PGD-20, CW-Linf and AutoAttack-rand >= -{STRONG_LOSS_MAX:g} pp "
        "(seeded attacks: means over evaluation seeds; AutoAttack-rand: one run with EOT). Holds if "
        "every bit width passes every part; partly if some widths pass."
    )
    return v
