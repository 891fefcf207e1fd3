"""Unit tests for search.front (pure numpy Pareto utilities, maximization)."""

import numpy as np
import pytest

from search import front
from search.front import (
    DEFAULT_REFERENCE,
    crowding_distance,
    hypervolume,
    non_dominated_mask,
    non_dominated_sort,
)


def test_default_reference():
    assert DEFAULT_REFERENCE == (0.0, 0.0, 0.0)


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
    np.testing.assert_array_equal(non_dominated_mask([[1.0, 2.0]]), [True])
    with pytest.raises(ValueError):
        non_dominated_mask([[np.nan, 1.0]])
    with pytest.raises(ValueError):
        non_dominated_mask([1.0, 2.0])  # 1-D is ambiguous


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


def test_hypervolume_backend_is_optunas_maintained_implementation():
    # If this fails, optuna moved/removed optuna._hypervolume.compute_hypervolume: update
    # search/front.py deliberately instead of silently running on the fallback.
    assert front.HYPERVOLUME_BACKEND == "optuna"
    assert front._optuna_compute_hypervolume is not None


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
    with pytest.raises(ValueError):
        hypervolume([[0.5, 0.5]], reference=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        hypervolume([[0.5, np.nan, 0.5]])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_hypervolume_optuna_matches_exact_fallback(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        pts = rng.uniform(-0.1, 1.0, size=(int(rng.integers(1, 25)), k))
        ref = np.full(k, 0.05)
        assert hypervolume(pts, ref) == pytest.approx(front._hypervolume_exact(pts, ref), abs=1e-12)


def test_hypervolume_matches_brute_force_cell_count():
    # integer points: volume equals the number of dominated unit cells, countable by brute force
    rng = np.random.default_rng(0)
    pts = rng.integers(1, 6, size=(8, 3)).astype(float)
    grid = np.stack(np.meshgrid(*[np.arange(5) + 0.5] * 3, indexing="ij"), -1).reshape(-1, 3)
    cells = np.any(np.all(pts[None, :, :] >= grid[:, None, :], axis=2), axis=1).sum()
    assert hypervolume(pts) == pytest.approx(float(cells))
    assert front._hypervolume_exact(pts, DEFAULT_REFERENCE) == pytest.approx(float(cells))
