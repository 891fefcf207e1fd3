"""Unit tests for search.front (moocore-backed Pareto utilities, maximization), the sweep's floors,
and the front of the results table (only feasible completed trials)."""

import numpy as np
import pytest

from search.front import (
    DEFAULT_REFERENCE,
    Floors,
    crowding_distance,
    feasible_mask,
    hypervolume,
    non_dominated_mask,
    non_dominated_sort,
)
from trainables.contract import OBJECTIVES


def test_default_reference_is_the_origin_of_the_three_objectives():
    """Without a reference the hypervolume is measured from the origin: a point's box is the
    product of its objectives, and a dense model (sparsity 0) adds nothing."""
    assert hypervolume([[0.5, 0.4, 0.25]]) == 0.5 * 0.4 * 0.25
    assert hypervolume([[0.9, 0.9, 0.0], [0.5, 0.4, 0.25]]) == 0.05
    assert hypervolume([[0.5, 0.4, 0.25]]) == hypervolume([[0.5, 0.4, 0.25]], DEFAULT_REFERENCE)


def test_non_dominated_mask_hand_built():
    pts = np.array(
        [
            [0.9, 0.1, 0.5],  # 0 non-dominated (best clean)
            [0.1, 0.9, 0.5],  # 1 non-dominated (best robust)
            [0.5, 0.5, 0.9],  # 2 non-dominated (best sparsity)
            [0.4, 0.4, 0.8],  # 3 dominated by 2
            [0.9, 0.1, 0.4],  # 4 dominated by 0 (equal in two, worse in one)
            [0.1, 0.1, 0.1],  # 5 dominated by everything above
        ]
    )
    np.testing.assert_array_equal(
        non_dominated_mask(pts), [True, True, True, False, False, False]
    )


def test_non_dominated_mask_duplicates_all_kept():
    pts = np.array([[0.5, 0.5], [0.5, 0.5], [0.2, 0.9], [0.2, 0.4]])
    np.testing.assert_array_equal(non_dominated_mask(pts), [True, True, True, False])


def test_non_dominated_mask_edge_cases():
    assert non_dominated_mask(np.zeros((0, 3))).shape == (0,)
    assert non_dominated_mask([]).dtype == bool and non_dominated_mask([]).shape == (0,)
    np.testing.assert_array_equal(non_dominated_mask([[1.0, 2.0]]), [True])
    with pytest.raises(ValueError):
        non_dominated_mask([[np.nan, 1.0]])
    with pytest.raises(ValueError, match=r"must have shape \(n, k\); got shape \(2,\)"):
        non_dominated_mask([1.0, 2.0])  # 1-D is ambiguous
    with pytest.raises(ValueError, match="contains NaN"):
        non_dominated_mask([[0.5, None]])  # a metric never reported is missing, not a value


def test_rows_without_objectives():
    """A row with no objective is on no front (moocore refuses it) and above no floor."""
    with pytest.raises(ValueError):
        non_dominated_mask(np.zeros((3, 0)))
    np.testing.assert_array_equal(feasible_mask([{}, {}, {}], Floors.for_sweep("digits")), [False] * 3)
    # three copies of the one empty row: at most two distinct points, so every distance is inf
    np.testing.assert_array_equal(crowding_distance(np.zeros((3, 0))), [np.inf] * 3)


def test_non_dominated_sort_fronts():
    pts = np.array([[3, 1], [1, 3], [2, 2], [1, 1], [2, 1], [0, 0], [0, 0]], dtype=float)
    fronts = non_dominated_sort(pts)
    assert [f.tolist() for f in fronts] == [[0, 1, 2], [4], [3], [5, 6]]
    allidx = np.sort(np.concatenate(fronts))
    np.testing.assert_array_equal(allidx, np.arange(len(pts)))


def test_crowding_distance():
    # 2-D front on x + y = 1: extremes get inf, interior gets the normalised neighbour gaps.
    pts = np.array([[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    cd = crowding_distance(pts)
    assert np.isinf(cd[0]) and np.isinf(cd[3])
    assert cd[1] == pytest.approx((0.5 - 0.0) / 1.0 + (1.0 - 0.5) / 1.0)
    assert cd[2] == pytest.approx((1.0 - 0.25) / 1.0 + (0.75 - 0.0) / 1.0)
    # small sets: all inf; duplicates share a value
    assert np.all(np.isinf(crowding_distance([[0.1, 0.2], [0.3, 0.1]])))
    dup = crowding_distance([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    assert dup[1] == dup[2] and np.isfinite(dup[1])
    assert crowding_distance(np.zeros((0, 2))).shape == (0,)


def test_crowding_distance_skips_objectives_without_a_finite_spread():
    """An objective whose spread is zero or infinite adds nothing; the others still count."""
    expected = [np.inf, 0.75, 0.75, np.inf]  # the second objective alone: (3 - 0) / 4, (4 - 1) / 4
    np.testing.assert_array_equal(crowding_distance([[-np.inf, 0.0], [0.0, 1.0], [1.0, 3.0], [2.0, 4.0]]),
                                  expected)
    np.testing.assert_array_equal(crowding_distance([[0.0, 1.0], [0.0, 2.0], [0.0, 4.0], [0.0, 5.0]]),
                                  [np.inf, 0.75, 0.75, np.inf])  # (4 - 1) / 4, (5 - 2) / 4


def test_hypervolume_one_point_3d():
    assert hypervolume([[0.5, 0.5, 0.5]]) == pytest.approx(0.125)
    assert hypervolume([[0.5, 0.5, 0.5]], reference=(0.1, 0.2, 0.0)) == pytest.approx(
        0.4 * 0.3 * 0.5
    )


def test_hypervolume_two_points_3d_inclusion_exclusion():
    a, b = (0.5, 0.5, 1.0), (1.0, 0.5, 0.5)
    # |A| + |B| - |A ∩ B| with A ∩ B = box up to the coordinate-wise minimum (0.5, 0.5, 0.5)
    expected = 0.25 + 0.25 - 0.125
    assert hypervolume([a, b]) == pytest.approx(expected)
    assert hypervolume([a, b], reference=DEFAULT_REFERENCE) == pytest.approx(0.375)


def test_hypervolume_three_points_3d_inclusion_exclusion():
    p = np.array([[0.9, 0.2, 0.3], [0.4, 0.8, 0.5], [0.3, 0.3, 0.9]])
    vol = lambda q: float(np.prod(q))
    expected = (
        vol(p[0]) + vol(p[1]) + vol(p[2])
        - vol(np.minimum(p[0], p[1])) - vol(np.minimum(p[0], p[2])) - vol(np.minimum(p[1], p[2]))
        + vol(np.minimum(np.minimum(p[0], p[1]), p[2]))
    )
    assert hypervolume(p) == pytest.approx(expected)


def test_hypervolume_2d():
    # staircase (0.2, 0.8), (0.6, 0.5), (0.9, 0.1) against (0, 0)
    pts = [[0.2, 0.8], [0.6, 0.5], [0.9, 0.1]]
    expected = 0.2 * 0.8 + (0.6 - 0.2) * 0.5 + (0.9 - 0.6) * 0.1
    assert hypervolume(pts, reference=(0.0, 0.0)) == pytest.approx(expected)


def test_hypervolume_unchanged_by_dominated_and_duplicate_points():
    base = [[0.5, 0.5, 1.0], [1.0, 0.5, 0.5]]
    hv = hypervolume(base)
    assert hypervolume(base + [[0.4, 0.4, 0.4]]) == pytest.approx(hv)
    assert hypervolume(base + [[0.5, 0.5, 0.5]]) == pytest.approx(hv)
    assert hypervolume(base + [base[0]]) == pytest.approx(hv)


def test_hypervolume_ignores_points_not_strictly_dominating_reference():
    ref = (0.1, 0.1, 0.1)
    only = [[0.5, 0.5, 0.5]]
    hv = hypervolume(only, reference=ref)
    assert hypervolume(only + [[0.05, 0.9, 0.9]], reference=ref) == pytest.approx(hv)
    assert hypervolume(only + [[0.1, 0.9, 0.9]], reference=ref) == pytest.approx(hv)
    assert hypervolume([[0.05, 0.9, 0.9]], reference=ref) == 0.0
    assert hypervolume(np.zeros((0, 3))) == 0.0


def test_hypervolume_input_validation():
    with pytest.raises(ValueError) as err:
        hypervolume([[0.5, 0.5]], reference=(0.0, 0.0, 0.0))
    assert str(err.value) == "reference has 3 coordinates, points have 2 objectives"
    with pytest.raises(ValueError) as err:
        hypervolume([[0.5, 0.5, 0.5]], reference=(0.0, np.nan, 0.0))
    assert str(err.value) == "reference contains NaN"
    with pytest.raises(ValueError, match="points contains NaN"):
        hypervolume([[0.5, np.nan, 0.5]])


def _cells(pts: np.ndarray, ref: np.ndarray, size: int) -> int:
    """Unit cells of the integer grid above `ref` dominated by some point (brute force)."""
    k = pts.shape[1]
    grid = np.stack(np.meshgrid(*[np.arange(size) + 0.5] * k, indexing="ij"), -1).reshape(-1, k) + ref
    return int(np.any(np.all(pts[None, :, :] >= grid[:, None, :], axis=2), axis=1).sum())


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_hypervolume_matches_brute_force_cell_count(k):
    # integer points: volume equals the number of dominated unit cells, countable by brute force;
    # points at or below the reference in some objective add nothing
    rng = np.random.default_rng(k)
    for _ in range(5):
        pts = rng.integers(-1, 6, size=(int(rng.integers(1, 12)), k)).astype(float)
        ref = np.zeros(k)
        assert hypervolume(pts, ref) == pytest.approx(float(_cells(pts[np.all(pts > ref, axis=1)], ref, 6)))


def test_non_dominated_sort_matches_peeling_on_random_points():
    rng = np.random.default_rng(1)
    pts = np.round(rng.random((60, 3)), 1)
    fronts = non_dominated_sort(pts)
    remaining = list(range(len(pts)))
    for f in fronts:
        dom = lambda a, b: np.all(pts[a] >= pts[b]) and np.any(pts[a] > pts[b])
        expect = [i for i in remaining if not any(dom(j, i) for j in remaining)]
        assert f.tolist() == expect
        remaining = [i for i in remaining if i not in expect]
    assert not remaining


# ------------------------------------------------------------------------- floors


def test_floors_for_sweep_chance_and_user_floors(tmp_path):
    f = Floors.for_sweep("digits")
    assert f.reference() == pytest.approx((0.1, 0.0, 0.0)) and f.chance == pytest.approx(0.1)
    assert Floors.for_sweep("digits", min_clean_acc=0.5, min_robust_acc=0.2).reference() == pytest.approx((0.5, 0.2, 0.0))
    assert Floors.for_sweep("digits", min_clean_acc=0.05).clean_acc == pytest.approx(0.1)  # never below chance
    for c in ("a", "b", "c", "d"):
        (tmp_path / "train" / c).mkdir(parents=True)
    assert Floors.for_sweep(f"folder:{tmp_path}").clean_acc == pytest.approx(0.25)
    assert "chance 1/10" in f.describe()


def test_feasible_mask_and_optuna_constraints_agree():
    f = Floors.for_sweep("digits", min_robust_acc=0.05)
    pts = np.array([[0.1, 0.3, 0.5],  # at chance: infeasible
                    [0.11, 0.3, 0.0],  # feasible
                    [0.9, 0.04, 0.2],  # below the robust floor
                    [0.9, 0.05, 0.2]])  # at the robust floor: feasible
    rows = [dict(zip(OBJECTIVES, p)) for p in pts]
    mask = feasible_mask(rows, f)
    assert mask.tolist() == [False, True, False, True]
    assert feasible_mask(rows[1:2], f).tolist() == [True]  # one row is a set like any other
    empty = feasible_mask([], f)
    assert empty.dtype == bool and empty.shape == (0,)
    # the sparsity floor counts too (>=): 0 for sweeps, but a floor is a floor
    assert feasible_mask(rows, Floors(0.1, 0.05, 0.3)).tolist() == [False, False, False, False]
    for row, ok in zip(rows, mask):
        assert all(v <= 0 for v in f.constraints(row).values()) == ok == f.feasible(row)


def test_a_cap_bounds_a_minimized_objective_and_the_clean_floor_holds_without_clean_acc():
    f = Floors.for_sweep("digits", objectives=("robust_acc", "size_kib"), max_size_kib=16.0)
    ok = {"clean_acc": 0.9, "robust_acc": 0.5, "size_kib": 16.0}  # at the cap: feasible
    assert f.feasible(ok) and all(v <= 0 for v in f.constraints(ok).values())
    for bad in ({**ok, "size_kib": 16.01}, {**ok, "clean_acc": 0.1}, {**ok, "size_kib": float("nan")},
                {"clean_acc": 0.9, "robust_acc": 0.5}):
        assert not f.feasible(bad)
        cs = f.constraints(bad).values()
        assert any(not v <= 0 for v in cs), bad  # > 0 or NaN: infeasible for Optuna too
    # MO-ASHA sees only the objectives: the cap counts at a rung, the clean floor at the end
    assert f.violation({"robust_acc": 0.5, "size_kib": 20.0}) == pytest.approx(4.0)
    assert f.violation({"robust_acc": 0.5, "size_kib": 10.0}) == 0.0
    assert f.reference() == pytest.approx((0.0, -16.0))


def test_gains_turn_a_minimized_objective_around_and_an_uncapped_reference_is_inferred():
    f = Floors.for_sweep("digits", objectives=("clean_acc", "size_kib"))
    pts = np.array([[0.9, 40.0], [0.8, 10.0], [0.7, 20.0]])  # the third: worse and bigger than the second
    g = f.gains(pts)
    assert g.tolist() == [[0.9, -40.0], [0.8, -10.0], [0.7, -20.0]]
    assert non_dominated_mask(g).tolist() == [True, True, False]
    ref = f.reference(g)
    assert ref == pytest.approx((0.1, -44.0))  # 10 % beyond the largest size measured
    # by construction: two boxes from the reference, overlapping in [0.1, 0.8] x [-44, -40]
    want = (0.9 - 0.1) * (44 - 40) + (0.8 - 0.1) * (40 - 10)
    assert hypervolume(g, ref) == pytest.approx(want)


def test_hypervolume_against_the_floor_ignores_chance_models():
    f = Floors.for_sweep("digits")
    useful = [[0.6, 0.3, 0.2]]
    chance_sparse = [[0.1, 0.1, 0.9]]  # at chance, very sparse: non-dominated, but useless
    hv = hypervolume(useful, f.reference())
    assert hv == pytest.approx(0.5 * 0.3 * 0.2)
    assert hypervolume(useful + chance_sparse, f.reference()) == pytest.approx(hv)


def _table(rows):
    import pandas as pd

    base = {"trial_id": None, "status": "completed", "clean_acc": None, "robust_acc": None, "channel_sparsity": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_results_front_holds_only_feasible_completed_trials():
    from search.results import feasible_column, front_frame, front_mask

    df = _table([
        {"trial_id": "a", "clean_acc": 0.8, "robust_acc": 0.4, "channel_sparsity": 0.0},
        {"trial_id": "b", "clean_acc": 0.6, "robust_acc": 0.3, "channel_sparsity": 0.3},
        # stopped early (PRUNED in Optuna) with proxies dominating every completed trial
        {"trial_id": "stopped", "status": "stopped", "clean_acc": 0.99, "robust_acc": 0.9, "channel_sparsity": 0.9},
        {"trial_id": "failed", "status": "failed", "clean_acc": 0.99, "robust_acc": 0.9, "channel_sparsity": 0.9},
        # completed at chance with high sparsity: non-dominated, but below the floor
        {"trial_id": "chance", "clean_acc": 0.1, "robust_acc": 0.1, "channel_sparsity": 0.95},
        {"trial_id": "dominated", "clean_acc": 0.5, "robust_acc": 0.2, "channel_sparsity": 0.1},
    ])
    df["feasible"] = feasible_column(df, Floors.for_sweep("digits"))
    assert df["feasible"].tolist() == [True, True, False, False, False, True]
    df["pareto"] = front_mask(df, Floors.for_sweep("digits"))
    assert set(df.loc[df["pareto"], "trial_id"]) == {"a", "b"}
    assert front_frame(df)["trial_id"].tolist() == ["a", "b"]
    # without floors the chance model would be on the front: the floor is what keeps it off
    df2 = df.drop(columns=["feasible"])
    assert "chance" in set(df2.loc[front_mask(df2), "trial_id"])


def test_results_front_minimizes_size_kib():
    """A 2-objective sweep with a minimized objective: the front trades accuracy for bytes."""
    from search.results import feasible_column, front_frame, front_mask

    f = Floors.for_sweep("digits", objectives=("clean_acc", "size_kib"))
    df = _table([
        {"trial_id": "big", "clean_acc": 0.95, "robust_acc": 0.5, "size_kib": 90.0},
        {"trial_id": "small", "clean_acc": 0.85, "robust_acc": 0.4, "size_kib": 12.0},
        {"trial_id": "worse", "clean_acc": 0.80, "robust_acc": 0.4, "size_kib": 30.0},  # dominated by small
        {"trial_id": "tiny_chance", "clean_acc": 0.10, "robust_acc": 0.1, "size_kib": 3.0},  # at chance
    ])
    df["feasible"] = feasible_column(df, f)
    df["pareto"] = front_mask(df, f)
    assert set(df.loc[df["pareto"], "trial_id"]) == {"big", "small"}
    front = front_frame(df, f)
    assert front["trial_id"].tolist() == ["big", "small"] and list(front.columns[:3]) == ["trial_id", "clean_acc", "size_kib"]
    # planted fault: read as maximized, the bigger model would dominate and "small" drop off
    maximized = Floors.for_sweep("digits", objectives=("clean_acc", "channel_sparsity"))
    assert non_dominated_mask(maximized.gains(df.loc[:2, ["clean_acc", "size_kib"]].to_numpy())).tolist() == [True, False, False]
