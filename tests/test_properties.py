"""Property-based tests (hypothesis) of the math: projections, the Pareto front, MO-ASHA's order
and every configuration range check. Each property holds for *every* input, so hypothesis
searches for a counterexample (ties, zeros, duplicates, one-element tensors) instead of the
few hand-picked cases of the unit tests."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from search.front import hypervolume, non_dominated_mask, non_dominated_sort
from search.optimizer import TIE_BREAKS, decide, rung_position
from trainables.config import AttackConfig, ConfigError, QuantConfig, TrainConfig
from trainables.quant import (
    project_binary,
    project_multibit,
    project_ternary_exact,
    project_ternary_twn,
)


def PROPS(f):  # settings come from the profile in conftest.py (default, or mutmut's)
    return f


# weights: exact zeros, ties and magnitudes over four decades (float64, so the checks below are
# about the algorithm, not float32 rounding)
magnitude = st.floats(min_value=1e-3, max_value=10.0, allow_nan=False, allow_infinity=False)
entry = st.one_of(st.just(0.0), magnitude, magnitude.map(lambda v: -v), st.sampled_from([0.5, -0.5, 1.0, -1.0]))
weights = st.lists(entry, min_size=1, max_size=40).map(lambda v: torch.tensor(v, dtype=torch.float64))
nonzero_weights = st.lists(st.one_of(magnitude, magnitude.map(lambda v: -v)), min_size=1, max_size=40).map(
    lambda v: torch.tensor(v, dtype=torch.float64))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def _sign_preserving(w: torch.Tensor, p: torch.Tensor) -> bool:
    """p keeps w's sign or is zero: never flips a weight, never makes a zero weight non-zero."""
    return bool(((p == 0) | (torch.sign(p) == torch.sign(w))).all())


def _one_scale(p: torch.Tensor, max_level: int) -> None:
    """p = s * k with one scale s > 0 and integer levels |k| <= max_level (the top level used
    need not be max_level, so every candidate top level is tried)."""
    mags = p[p != 0].abs()
    if mags.numel() == 0:
        return
    top = mags.max()
    for k_top in range(1, max_level + 1):
        k = mags / (top / k_top)
        if torch.allclose(k, k.round(), rtol=0, atol=1e-6) and int(k.round().min()) >= 1:
            return
    raise AssertionError(f"{p.tolist()} is not one scale times integer levels up to {max_level}")


# --- projections ---------------------------------------------------------------------------------

@PROPS
@given(nonzero_weights)
def test_binary_projection_properties(w):
    p = project_binary(w)
    assert _sign_preserving(w, p)
    assert len(torch.unique(p)) <= 2  # {-d, d}
    assert torch.allclose(p.abs(), w.abs().mean().expand_as(p))
    assert _close(project_binary(p), p)  # idempotent (on weights without exact zeros)


@PROPS
@given(weights)
def test_binary_projection_keeps_exact_zeros(w):
    p = project_binary(w)
    assert _sign_preserving(w, p)
    assert torch.equal(p == 0, w == 0)
    assert len(torch.unique(p[p != 0])) <= 2


@PROPS
@given(weights)
def test_exact_ternary_projection_properties(w):
    p = project_ternary_exact(w)
    assert _sign_preserving(w, p)
    assert len(torch.unique(p)) <= 3
    _one_scale(p, 1)
    assert _close(project_ternary_exact(p), p)  # idempotent
    # the entries it keeps are the largest ones: nothing dropped is larger than anything kept
    if (p != 0).any() and (p == 0).any():
        assert float(w[p == 0].abs().max()) <= float(w[p != 0].abs().min())


@PROPS
@given(st.lists(st.one_of(st.just(0.0), st.integers(-3, 3).map(float), magnitude, magnitude.map(lambda v: -v)),
                min_size=1, max_size=7))
def test_exact_ternary_is_optimal_against_brute_force(values):
    """min over every q in {-1, 0, 1}^n and delta >= 0 of ||delta q - w||^2, by enumeration."""
    w = np.array(values)
    best = float(w @ w)  # q = 0
    for q in itertools.product((-1.0, 0.0, 1.0), repeat=len(w)):
        q = np.array(q)
        qq = float(q @ q)
        if qq and (wq := float(q @ w)) > 0:
            best = min(best, float(w @ w) - wq * wq / qq)
    p = project_ternary_exact(torch.tensor(w)).numpy()
    assert float(((p - w) ** 2).sum()) == pytest.approx(best, rel=1e-9, abs=1e-9)


@PROPS
@given(weights)
def test_twn_ternary_projection_properties(w):
    """The reference 0.7 * mean|w| rule: sign-preserving and three levels, but (scale divided by n,
    not by the kept count) not idempotent; re-projecting keeps the support and the signs."""
    p = project_ternary_twn(w)
    assert _sign_preserving(w, p)
    assert len(torch.unique(p)) <= 3
    _one_scale(p, 1)
    if (p != 0).any():
        assert torch.equal(project_ternary_twn(p) != 0, p != 0)
    # never better than the exact projection, which is optimal
    assert float(((project_ternary_exact(w) - w) ** 2).sum()) <= float(((p - w) ** 2).sum()) + 1e-9


@PROPS
@given(weights, st.integers(3, 8), st.integers(1, 4))
def test_multibit_projection_properties(w, bits, lloyd_iters):
    K = 2 ** (bits - 1) - 1
    p = project_multibit(w, bits, lloyd_iters)
    assert _sign_preserving(w, p)
    assert len(torch.unique(p)) <= 2**bits - 1
    _one_scale(p, K)
    assert _close(project_multibit(p, bits, lloyd_iters), p)  # idempotent
    # no worse than rounding to zero, and more Lloyd steps never raise the error
    err = float(((p - w) ** 2).sum())
    assert err <= float((w * w).sum()) * (1 + 1e-9)
    more = project_multibit(w, bits, lloyd_iters + 1)
    assert float(((more - w) ** 2).sum()) <= err * (1 + 1e-9) + 1e-12


@PROPS
@given(weights, st.integers(3, 8))
def test_multibit_largest_weight_gets_the_top_level(w, bits):
    assume(bool((w != 0).any()))
    p = project_multibit(w, bits, 1)
    i = int(w.abs().argmax())
    top = p.abs().max()
    assert float(top) > 0 and p[i].abs() == top
    assert float(w.abs().max()) > 0 and float(top) > 0


# --- the Pareto front ----------------------------------------------------------------------------

def _brute_non_dominated(pts: np.ndarray) -> list[bool]:
    """The definition, written independently: a is dominated iff some b >= a everywhere and > somewhere."""
    return [not any(all(b >= a) and any(b > a) for j, b in enumerate(pts) if j != i) for i, a in enumerate(pts)]


# few distinct values per coordinate: ties and duplicates are common, as in real accuracies
point_sets = st.integers(1, 4).flatmap(lambda k: arrays(
    np.float64, st.tuples(st.integers(0, 12), st.just(k)),
    elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, -np.inf, np.inf])))


@PROPS
@given(point_sets)
@example(np.array([[-np.inf, -np.inf, 0.0], [-np.inf, 0.0, -np.inf]]))  # moocore ranked these apart
def test_front_equals_brute_force_non_dominated_set(pts):
    assert non_dominated_mask(pts).tolist() == _brute_non_dominated(pts)


@PROPS
@given(point_sets)
@example(np.array([[-np.inf, -np.inf, 0.0], [-np.inf, 0.0, -np.inf]]))  # moocore ranked these apart
def test_non_dominated_sort_is_a_layered_partition(pts):
    fronts = non_dominated_sort(pts)
    idx = np.concatenate(fronts) if fronts else np.zeros(0, dtype=int)
    assert sorted(idx.tolist()) == list(range(len(pts)))  # every row exactly once
    for r, f in enumerate(fronts):
        assert len(f) > 0
        assert non_dominated_mask(pts[f]).all()  # a front is mutually non-dominated
        if r:  # every member of a later front is dominated by a member of the one before
            prev = pts[fronts[r - 1]]
            for i in f:
                assert any(np.all(b >= pts[i]) and np.any(b > pts[i]) for b in prev)


finite_sets = st.integers(1, 3).flatmap(lambda k: arrays(
    np.float64, st.tuples(st.integers(0, 8), st.just(k)),
    elements=st.sampled_from([-0.05, 0.0, 0.1, 0.3, 0.5, 0.8, 1.0])))


@PROPS
@given(finite_sets, finite_sets)
def test_hypervolume_is_the_fronts_and_monotone(a, b):
    assume(a.shape[1] == b.shape[1])
    ref = (-0.1,) * a.shape[1]
    hv = hypervolume(a, ref)
    if len(a):
        assert hv == pytest.approx(hypervolume(a[non_dominated_mask(a)], ref), abs=1e-12)
        # bounded by the box from the reference to the best value in every objective
        assert hv <= float(np.prod(a.max(axis=0) - np.array(ref))) + 1e-12
        # at least the box of any single point
        assert hv >= max(float(np.prod(p - np.array(ref))) for p in a) - 1e-12
    assert hypervolume(np.vstack([a, b]), ref) >= max(hv, hypervolume(b, ref)) - 1e-12


# --- MO-ASHA's order -----------------------------------------------------------------------------

@PROPS
@given(point_sets, st.sampled_from(TIE_BREAKS))
def test_rung_positions_respect_dominance(pts, tie_break):
    pts = np.where(np.isinf(pts), np.sign(pts) * 2.0, pts)  # finite: the scheduler maps inf itself
    n = len(pts)
    assume(n > 0)
    pos = [rung_position(pts, i, tie_break) for i in range(n)]
    assert all(0 <= p < n for p in pos) and min(pos) == 0
    for i, j in itertools.permutations(range(n), 2):
        if np.all(pts[i] >= pts[j]) and np.any(pts[i] > pts[j]):
            assert pos[i] < pos[j], (pts[i], pts[j], pos)


@PROPS
@given(point_sets, st.sampled_from([2.0, 3.0, 4.0]), st.sampled_from(TIE_BREAKS))
def test_decide_continues_a_dominating_vector_and_stops_a_dominated_one(pts, eta, tie_break):
    pts = np.where(np.isinf(pts), np.sign(pts) * 2.0, pts)
    assume(len(pts) > 0)
    k = pts.shape[1]
    assert decide(pts, pts.max(axis=0) + 1.0, eta, tie_break)  # strictly ahead of everything: continues
    # strictly behind all n - 1 recorded vectors: position n - 1, kept iff (n - 1) / n <= 1 / eta
    n = len(pts) + 1
    assert decide(pts, pts.min(axis=0) - 1.0, eta, tie_break) == ((n - 1) * eta <= n)
    assert decide(np.zeros((0, k)), np.zeros(k), eta, tie_break)  # the first at a rung always continues


# --- every configuration range check -------------------------------------------------------------

def _set(cfg: TrainConfig, path: str, value) -> None:
    target = cfg
    *head, last = path.split(".")
    for h in head:
        target = getattr(target, h)
    setattr(target, last, value)


def _down(x: float) -> float:
    return math.nextafter(x, -math.inf)


def _up(x: float) -> float:
    return math.nextafter(x, math.inf)


# field -> (values just outside the accepted range, values on its edge or inside)
RANGES: dict[str, tuple[list, list]] = {
    "quant.bits": ([0, 9, 16, 31, 33], [1, 8, 32]),
    "quant.lloyd_iters": ([0, -1], [1]),
    "quant.lambda0": ([0.0, -1e-12, math.nan], [1e-12, 1.0]),
    "quant.lambda_final": ([_down(1.0), math.nan], [1.0, 100.0]),  # >= lambda0 (1.0 by default)
    "quant.lambda_schedule": (["linear", ""], ["final", "rho"]),
    "quant.rho": ([_down(1.0), 0.0, math.nan], [1.0, 1.05]),
    "quant.phase2_start": ([_down(0.0), _up(1.0), math.nan], [0.0, 1.0]),
    "quant.ternary_mode": (["twn", ""], ["twn0.7", "exact"]),
    "train_attack.kind": (["l2", ""], ["fgsm", "pgd", "cw", "trades"]),
    "train_attack.eps": ([_down(0.0), math.nan], [0.0, 8 / 255]),
    "train_attack.step": ([_down(0.0), math.nan], [0.0]),
    "train_attack.steps": ([0], [1]),
    "eval_attack.eps": ([_down(0.0)], [0.0]),
    "eval_attack.step": ([_down(0.0)], [0.0]),
    "eval_attack.steps": ([0], [1]),
    "eval_attack.kind": (["nope"], ["pgd"]),
    "loss": (["ce", ""], ["madry", "mix", "trades"]),
    "depth": ([7, 9, 2, 0], [8, 14, 20]),
    "width": ([0], [1]),
    "ensemble": ([0], [1]),
    "epochs": ([0], [1]),
    "batch_size": ([0], [1]),
    "subset_train": ([0], [1, None]),
    "subset_test": ([0], [1, None]),
    "alpha": ([_down(0.0), _up(1.0), math.nan], [0.0, 1.0]),
    "beta": ([_down(0.0), math.nan], [0.0]),
    "noise": ([_down(0.0), math.nan], [0.0]),
    "lr": ([0.0, _down(0.0), math.nan], [1e-12]),
    "group_lasso": ([_down(0.0), math.nan], [0.0]),
    "group_axis": (["both"], ["out", "in"]),
    "group_mode": (["l1"], ["penalty", "prox"]),
    "val_fraction": ([0.0, _down(0.0), 1.0], [_up(0.0), _down(1.0)]),  # the objectives' split: never empty
    "attack_bn": (["nope", ""], ["auto", "train", "eval"]),
    "proxy_bn_batches": ([-1], [0, 4]),
    "precision": (["fp64", ""], ["fp32", "bf16", "fp16"]),
    "eval_batch_size": ([0], [1]),
    "eval_draws": ([0, -1], [1, 20]),
    "latency": (["final", "", "always"], ["end", "every", "off"]),
    "latency_threads": ([0], [1, 4]),
    "latency_runs": ([0], [1, 50]),
    "device": (["gpu", "tpu"], ["auto", "cpu", "cuda", "cuda:1"]),
    "dataset": (["nope", "folder:"], ["digits", "folder:/x"]),
}
# fields any value of their type is fine for (no range to check)
UNCHECKED = {"data_root", "download", "augment", "momentum", "weight_decay", "lr_milestones",
             "proxy_eval_size", "proxy_attack_steps", "cw", "seed", "eval_seed", "max_grad_norm",
             "quant.quantize_stem", "channels_last", "compile", "deterministic", "quant.quantize_shortcut", "quant.quantize_fc",
             "train_attack.random_start", "eval_attack.random_start"}


def _all_fields() -> set[str]:
    out = set()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("quant", "train_attack", "eval_attack"):
            sub = QuantConfig if f.name == "quant" else AttackConfig
            out |= {f"{f.name}.{g.name}" for g in dataclasses.fields(sub)}
        else:
            out.add(f.name)
    return out


def test_every_config_field_has_a_range_check_here():
    """A new field needs a line in RANGES (or in UNCHECKED, with no range): then the tests below
    check its range."""
    missing = _all_fields() - set(RANGES) - UNCHECKED
    assert not missing, f"add these config fields to RANGES or UNCHECKED: {sorted(missing)}"


@pytest.mark.parametrize("field", sorted(RANGES))
def test_range_check_rejects_just_outside_and_accepts_the_edge(field):
    bad, good = RANGES[field]
    name = field.split(".")[-1]
    for value in good:
        cfg = TrainConfig()
        _set(cfg, field, value)
        cfg.validate()
    for value in bad:
        cfg = TrainConfig()
        _set(cfg, field, value)
        with pytest.raises(ConfigError) as e:
            cfg.validate()
        msg = str(e.value)
        assert "\n" not in msg and "accepted" in msg, msg
        assert name in msg or repr(value) in msg or str(value) in msg, (field, value, msg)


@PROPS
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
def test_fraction_fields_accept_exactly_their_interval(v):
    for field, lo, hi, hi_open in (("alpha", 0, 1, False), ("quant.phase2_start", 0, 1, False),
                                   ("val_fraction", 0, 1, True)):
        cfg = TrainConfig()
        _set(cfg, field, v)
        inside = lo < v < hi if hi_open else lo <= v <= hi
        if inside:
            cfg.validate()
        else:
            with pytest.raises(ConfigError):
                cfg.validate()
