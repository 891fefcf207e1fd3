"""Unit tests for search.optimizer._moasha, driven by synthetic result dicts (no ray.init needed)."""

import math
import pickle

import numpy as np
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.optimizer import MOASHAScheduler, MOASHAStateCallback, RungRule, decide, rung_position

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
OBJ = ["clean_acc", "robust_acc", "channel_sparsity"]


def make_trial() -> Trial:
    # A stub Trial is a real Tune Trial that needs no registered trainable and no Ray cluster.
    return Trial("__fake", stub=True)


def report(sched, trial, t, vec, time_attr="epoch"):
    result = {time_attr: t, **dict(zip(OBJ, vec))}
    return sched.on_trial_result(None, trial, result)


def make_sched(**kw):
    args = dict(metrics=OBJ, modes=["max"] * 3, time_attr="epoch", grace_period=1,
                reduction_factor=2, max_t=8)
    args.update(kw)
    return MOASHAScheduler(**args)


# ----------------------------------------------------------------------- pure decision


def test_decide_first_vector_at_a_rung_continues():
    assert decide([], [0.0, 0.0, 0.0], 3)
    assert decide([], [0.0, 0.0, 0.0], 3, tie_break="epsnet")


def test_decide_dominated_vs_non_dominated():
    rung = [[0.8, 0.5, 0.5]]
    assert not decide(rung, [0.7, 0.4, 0.5], 3)  # dominated: rank 1/2 > 1/3
    assert decide(rung, [0.7, 0.4, 0.5], 2)  # rank 1/2 <= 1/2 (Syne Tune's rule keeps it)
    assert decide(rung, [0.5, 0.8, 0.5], 3)  # mutually non-dominated, both extremes: tie
    assert decide(rung, [0.8, 0.5, 0.5], 3)  # identical: tie resolves optimistically
    assert decide(rung, [0.9, 0.6, 0.6], 3)  # dominates the recorded one


def test_keep_rule_is_normalised_rank_at_most_one_over_eta():
    # the rule's small case: of 3 at a rung with eta = 3, Syne Tune's rank/n <= 1/eta keeps 2
    chain = [[0.5] * 3, [0.4] * 3]
    assert decide(chain, [0.45] * 3, 3)  # position 1: 1/3 <= 1/3
    assert not decide(chain, [0.35] * 3, 3)  # position 2
    # 6 vectors in a dominance chain: positions 0..5
    chain = [[i / 10] * 3 for i in range(5, 0, -1)]
    assert decide(chain, [0.35] * 3, 3)  # position 2: 2/6 <= 1/3
    assert not decide(chain, [0.25] * 3, 3)  # position 3
    assert decide(chain, [0.25] * 3, 2)  # 3/6 <= 1/2
    assert not decide(chain, [0.15] * 3, 2)  # 4/6


def test_decide_crowding_breaks_ties_inside_a_front():
    # 2-D front on x + y = 1: the extremes have infinite crowding distance, and the interior
    # points are ordered by crowding distance: (0.5, 0.5) -> 1.4 beats (0.3, 0.7) -> 1.0.
    pts = [[0.0, 1.0], [1.0, 0.0], [0.3, 0.7], [0.5, 0.5]]
    assert [rung_position(pts, i) for i in range(4)] == [0, 0, 3, 2]
    ext = pts[:2]
    assert decide(ext + [[0.3, 0.7]], [0.5, 0.5], 2)  # position 2: 2/4 <= 1/2
    assert not decide(ext + [[0.5, 0.5]], [0.3, 0.7], 2)  # position 3


def test_epsnet_order_inside_a_front():
    # best first objective first (1, 0), then the farthest from it (0, 1), then (0.5, 0.5)
    # (distance 0.71 to both), then (0.3, 0.7) and (0.2, 0.8)
    pts = [[0.0, 1.0], [1.0, 0.0], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8]]
    pos = [rung_position(pts, i, tie_break="epsnet") for i in range(5)]
    assert pos[1] == 0 and pos[0] == 1 and pos[3] == 2 and sorted(pos) == [0, 1, 2, 3, 4]
    # a copy of a picked point is at distance 0: the new copy takes its first copy's place
    assert rung_position(pts + [[0.5, 0.5]], -1, tie_break="epsnet") == 2


def test_rung_position_nan_is_worst():
    pts = [[0.5, 0.5], [0.4, 0.4], [np.nan, 0.9], [0.6, 0.6]]
    # NaN -> worst clean value, but (nan, 0.9) still has the best robust value: front 0
    assert [rung_position(pts, i) for i in range(4)] == [2, 3, 0, 0]
    assert not decide([[0.1, 0.1]], [np.nan, 0.0], 3)


@pytest.mark.parametrize("tie_break", ["crowding", "epsnet"])
def test_new_trial_dominating_every_recorded_one_continues(tie_break):
    # Syne Tune 0.16 feeds an argsort to np.searchsorted and can stop this trial (5 recorded)
    rng = np.random.default_rng(3)
    for _ in range(200):
        rung = rng.random((5, 3)) * 0.9
        assert decide(rung, rung.max(axis=0) + 0.05, 3, tie_break=tie_break)


# ------------------------------------------------------------- brute-force statement of the rule


def _dominates(a, b):
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def _brute_position(pts, i, tie_break, finite_spread_only=False):
    """The rule written out plainly: peel non-dominated fronts; inside the trial's front order by
    crowding distance (larger first, ties share a place) or by the greedy epsilon-net (best first
    objective first, then the point farthest from those picked); count what is ahead."""
    n = len(pts)
    rank, remaining, r = {}, set(range(n)), 0
    while remaining:
        front = {j for j in remaining if not any(_dominates(pts[k], pts[j]) for k in remaining)}
        for j in front:
            rank[j] = r
        remaining -= front
        r += 1
    ahead = sum(rank[j] < rank[i] for j in range(n))
    F = [j for j in range(n) if rank[j] == rank[i]]
    if tie_break == "crowding":
        uniq = sorted({tuple(pts[j]) for j in F})
        m, k = len(uniq), len(uniq[0])
        cd = {u: (math.inf if m <= 2 else 0.0) for u in uniq}
        if m > 2:
            for d in range(k):
                order = sorted(range(m), key=lambda u: uniq[u][d])
                cd[uniq[order[0]]] = cd[uniq[order[-1]]] = math.inf
                span = uniq[order[-1]][d] - uniq[order[0]][d]
                if span > 0 and (not finite_spread_only or math.isfinite(span)):
                    for q in range(1, m - 1):
                        cd[uniq[order[q]]] += (uniq[order[q + 1]][d] - uniq[order[q - 1]][d]) / span
        return ahead + sum(cd[tuple(pts[j])] > cd[tuple(pts[i])] for j in F)
    first = max(F, key=lambda j: (pts[j][0], -j))
    picked = [first]
    while len(picked) < len(F):
        rest = [j for j in F if j not in picked]
        far = lambda j: min(float(np.linalg.norm(np.asarray(pts[j]) - np.asarray(pts[p]))) for p in picked)
        picked.append(max(rest, key=lambda j: (far(j), -j)))
    return ahead + min(picked.index(j) for j in F if tuple(pts[j]) == tuple(pts[i]))


@pytest.mark.parametrize("tie_break", ["crowding", "epsnet"])
def test_decisions_match_brute_force_rule_on_random_rungs(tie_break):
    rng = np.random.default_rng(0)
    for case in range(300):
        n = int(rng.integers(1, 25))
        k = int(rng.integers(2, 4))
        pts = np.round(rng.random((n, k)), int(rng.integers(1, 3)))  # coarse values: ties, duplicates
        eta = float(rng.choice([2, 3, 4, 4 / 3]))
        pos = _brute_position(pts.tolist(), n - 1, tie_break)
        want = pos / n <= 1 / eta + 1e-12
        got = decide(pts[:-1], pts[-1], eta, tie_break=tie_break)
        assert got == want, (case, tie_break, eta, pts.tolist(), pos)
        if tie_break == "crowding":
            assert rung_position(pts, n - 1) == pos


@pytest.mark.parametrize("tie_break", ["crowding", "epsnet"])
def test_floor_decisions_match_brute_force_rule_on_random_rungs(tie_break):
    """With violations: feasible vectors first in the rule's own order (computed among the
    feasible ones only), then the infeasible ones by violation, ties in the new vector's favour."""
    rng = np.random.default_rng(1)
    for case in range(300):
        n = int(rng.integers(1, 20))
        pts = np.round(rng.random((n, 3)), int(rng.integers(1, 3)))
        viol = np.where(rng.random(n) < 0.4, np.round(rng.random(n), 1), 0.0)
        eta = float(rng.choice([2, 3, 4]))
        feas = [j for j in range(n) if viol[j] <= 0]
        if viol[-1] <= 0:
            pos = _brute_position([pts[j].tolist() for j in feas], len(feas) - 1, tie_break)
        else:
            pos = len(feas) + sum(viol[j] < viol[-1] for j in range(n) if viol[j] > 0)
        want = pos / n <= 1 / eta + 1e-12
        got = decide(pts[:-1], pts[-1], eta, tie_break=tie_break, violations=viol)
        assert got == want, (case, tie_break, eta, pts.tolist(), viol.tolist(), pos)


def _extended_brute_position(pts, i, tie_break):
    """The non-finite rule written out (search.optimizer's docstring): NaN is -inf; dominance
    and crowding on the extended reals (an objective with an infinite or zero spread adds nothing
    to interior rows); the epsilon-net on stand-ins 1 outside each column's finite range."""
    ext = [[-math.inf if math.isnan(v) else v for v in row] for row in pts]
    if tie_break == "crowding":
        return _brute_position(ext, i, "crowding", finite_spread_only=True)
    cols = list(zip(*ext))
    finite = [[v for v in c if math.isfinite(v)] for c in cols]
    lo = [min(f) if f else 0.0 for f in finite]
    hi = [max(f) if f else 0.0 for f in finite]
    stand = [[lo[d] - 1 if v == -math.inf else hi[d] + 1 if v == math.inf else v for d, v in enumerate(row)]
             for row in ext]
    return _brute_position(stand, i, "epsnet")


def _mixed_rung(rng, n, k):
    pts = np.round(rng.random((n, k)), int(rng.integers(1, 3)))
    odd = rng.random((n, k)) < 0.2
    if rng.random() < 0.5:  # an objective with no finite value at the rung
        odd[:, int(rng.integers(k))] = True
    pts[odd] = rng.choice([np.nan, np.inf, -np.inf], size=int(odd.sum()))
    return pts


@pytest.mark.parametrize("tie_break", ["crowding", "epsnet"])
def test_non_finite_decisions_match_brute_force_rule_on_random_rungs(tie_break):
    """Rungs that mix NaN, +inf and -inf with finite values, with and without floors."""
    rng = np.random.default_rng(2)
    for case in range(400):
        n = int(rng.integers(1, 16))
        pts = _mixed_rung(rng, n, int(rng.integers(2, 4)))
        eta = float(rng.choice([2, 3, 4]))
        pos = _extended_brute_position(pts.tolist(), n - 1, tie_break)
        got = decide(pts[:-1], pts[-1], eta, tie_break=tie_break)
        assert got == (pos / n <= 1 / eta + 1e-12), (case, tie_break, eta, pts.tolist(), pos)
        if tie_break == "crowding":
            assert rung_position(pts, n - 1) == pos, (case, pts.tolist())
        viol = np.where(rng.random(n) < 0.3, np.round(rng.random(n), 1), 0.0)
        feas = [j for j in range(n) if viol[j] <= 0]
        if viol[-1] <= 0:
            pos = _extended_brute_position([pts[j].tolist() for j in feas], len(feas) - 1, tie_break)
        else:
            pos = len(feas) + sum(viol[j] < viol[-1] for j in range(n) if viol[j] > 0)
        got = decide(pts[:-1], pts[-1], eta, tie_break=tie_break, violations=viol)
        assert got == (pos / n <= 1 / eta + 1e-12), (case, tie_break, eta, pts.tolist(), viol.tolist(), pos)


def test_non_finite_objectives_worked_example():
    """Rung (clean, robust) A .72 .37, B .21 .41, C .44 1, D .86 NaN, E .19 .69; new N .76 .08,
    eta 3. NaN is -inf, so D is the best clean and the worst robust value. Front 0: A, C, D, N
    (C dominates B and E). Crowding: clean sorted C .44, A .72, N .76, D .86: C and D extremes,
    A (.76 - .44) / .42 = 0.76, N (.86 - .72) / .42 = 0.33; robust holds -inf, an infinite
    spread, so it adds nothing (stand-ins .08 - 1 would add 0.67 to N and 0.48 to A). N is
    behind C, D, A: position 3 of 6 > 1/3, STOP."""
    rung = [[.72, .37], [.21, .41], [.44, 1.0], [.86, np.nan], [.19, .69]]
    assert rung_position(rung + [[.76, .08]], -1) == 3
    assert not decide(rung, [.76, .08], 3)
    assert rung_position(rung + [[.76, .08]], 3) == 0  # D: an extreme of both objectives
    # +inf is the best value: a vector with it in one objective is never dominated
    assert rung_position([[0.9, 0.9], [0.8, 0.8], [0.1, np.inf]], -1) == 0
    # a column all NaN: no spread, it adds nothing; the others order the interior rows:
    # (.4, .6) gets (.5 - .1) / .8 + (.9 - .5) / .8 = 1.0, (.5, .5) gets (.9 - .4) / .8 + (.6 - .1) / .8 = 1.25
    rung = [[np.nan, .1, .9], [np.nan, .5, .5], [np.nan, .9, .1], [np.nan, .4, .6]]
    assert [rung_position(rung, i) for i in range(4)] == [0, 2, 0, 3]


def test_scheduler_with_floors_stops_a_collapsed_trial_that_sparsity_alone_would_keep():
    from search.front import Floors

    floors = Floors.for_sweep("digits")  # clean accuracy must be above chance, 0.1
    good, collapsed = [0.9, 0.7, 0.0], [0.1, 0.0, 1.0]  # a chance-level model with every channel zero
    for violation, expected in ((None, CONTINUE), (floors.violation, STOP)):
        s = make_sched(reduction_factor=3, violation=violation)
        report(s, make_trial(), 1, good)
        # without floors the two are mutually non-dominated extremes: position 0 of 2, kept;
        # with them the collapsed one is behind the feasible one: 1/2 > 1/3
        assert s.decisions[-1]["feasible"] is True  # violation 0: on the floor's right side
        assert report(s, make_trial(), 1, collapsed) == expected
        assert s.decisions[-1]["feasible"] is (violation is None)
    s = make_sched(reduction_factor=2, violation=floors.violation)
    assert pickle.loads(pickle.dumps(s))._violation(dict(zip(OBJ, collapsed))) > 0  # tuner.pkl holds it
    assert floors.violation({"clean_acc": float("nan"), "robust_acc": 0.5}) == math.inf


# ----------------------------------------------------------------------- scheduler


def test_scheduler_is_fifo_subclass_with_string_metric():
    s = make_sched()
    assert isinstance(s, FIFOScheduler)
    # Tune's strict metric check does `scheduler.metric not in result`: must be a str
    assert s.metric == "clean_acc" and isinstance(s.metric, str)
    assert s.metrics == OBJ and s.modes == ["max"] * 3
    assert s.milestones == [1, 2, 4]  # grace * eta**k < max_t; no rung at max_t = 8
    assert all(isinstance(m, int) for m in s.milestones)
    assert make_sched(grace_period=1, reduction_factor=2.5, max_t=8).milestones == [1, 2.5, 6.25]


def test_milestones_eta3():
    s = make_sched(grace_period=1, reduction_factor=3, max_t=27)
    assert s.milestones == [1, 3, 9]
    s = make_sched(grace_period=2, reduction_factor=3, max_t=30)
    assert s.milestones == [2, 6, 18]


def test_set_search_properties_keeps_our_metrics():
    s = make_sched()
    assert s.set_search_properties(None, None) is True
    assert s.set_search_properties(None, None, config={}) is True
    assert s.metric == "clean_acc" and s.metrics == OBJ
    assert s.set_search_properties("robust_acc", "max") is True
    assert s.set_search_properties("robust_acc", "min") is False
    assert s.set_search_properties("loss", "min") is False
    assert s.metrics == OBJ


def test_continues_non_dominated_and_stops_dominated_at_rung():
    s = make_sched(reduction_factor=2)
    a, b, c, d = (make_trial() for _ in range(4))
    assert report(s, a, 1, [0.9, 0.3, 0.5]) == CONTINUE  # first at rung
    assert report(s, b, 1, [0.3, 0.9, 0.5]) == CONTINUE  # non-dominated, tie with a
    assert report(s, c, 1, [0.2, 0.2, 0.4]) == STOP  # dominated by a and b
    assert report(s, d, 1, [0.5, 0.5, 0.9]) == CONTINUE  # non-dominated (best sparsity)
    assert s.stopped_trials == {c.trial_id}
    assert {x["trial_id"] for x in s.decisions if x["decision"] == STOP} == {c.trial_id}


def test_eta3_five_trials_at_a_rung_stops_the_right_ones():
    # Rung at epoch 2; eta = 3; continue iff position / n <= 1/3. Arrival order matters (asynchronous).
    s = make_sched(grace_period=2, reduction_factor=3, max_t=8)
    t1, t2, t3, t4, t5 = (make_trial() for _ in range(5))
    for tr in (t1, t2, t3, t4, t5):
        assert report(s, tr, 1, [0.0, 0.0, 0.0]) == CONTINUE  # below grace: never judged
    assert report(s, t1, 2, [0.5, 0.5, 0.5]) == CONTINUE  # n=1, position 0
    assert report(s, t2, 2, [0.4, 0.4, 0.4]) == STOP  # n=2, position 1: 1/2 > 1/3
    assert report(s, t3, 2, [0.6, 0.6, 0.6]) == CONTINUE  # n=3, dominates everything
    assert report(s, t4, 2, [0.45, 0.45, 0.45]) == STOP  # n=4, position 2
    assert report(s, t5, 2, [0.55, 0.55, 0.55]) == CONTINUE  # n=5, position 1: 1/5 <= 1/3
    assert s.stopped_trials == {t2.trial_id, t4.trial_id}
    recs = s.rung_records()[2]
    assert set(recs) == {t1.trial_id, t2.trial_id, t3.trial_id, t4.trial_id, t5.trial_id}
    # a stopped trial stays stopped if another (buffered) result arrives
    assert report(s, t2, 3, [1.0, 1.0, 1.0]) == STOP


def test_never_stops_before_grace_period():
    s = make_sched(grace_period=3, reduction_factor=3, max_t=12)
    good = make_trial()
    assert report(s, good, 3, [0.9, 0.9, 0.9]) == CONTINUE
    bad = make_trial()
    for epoch in (0, 1, 2):
        assert report(s, bad, epoch, [0.0, 0.0, 0.0]) == CONTINUE
    assert not s.stopped_trials
    assert report(s, bad, 3, [0.0, 0.0, 0.0]) == STOP


def test_trial_is_judged_once_per_rung():
    s = make_sched(grace_period=2, reduction_factor=3, max_t=27)  # rungs 2, 6, 18
    a, b = make_trial(), make_trial()
    assert report(s, a, 2, [0.9, 0.9, 0.9]) == CONTINUE
    assert report(s, b, 2, [0.9, 0.9, 0.9]) == CONTINUE  # tie
    # later results between rungs (epoch 3) do not re-judge at rung 2
    assert report(s, b, 3, [0.0, 0.0, 0.0]) == CONTINUE
    assert len(s.rung_records()[2]) == 2
    # next rung judges b again with its new values
    assert report(s, a, 6, [0.9, 0.9, 0.9]) == CONTINUE
    assert report(s, b, 6, [0.1, 0.1, 0.1]) == STOP


def test_trial_reaching_max_t_is_not_stopped_by_rung_logic():
    s = make_sched(grace_period=1, reduction_factor=3, max_t=9)  # rungs 1, 3
    best = make_trial()
    for e in range(1, 10):
        assert report(s, best, e, [0.9, 0.9, 0.9]) == CONTINUE
    late = make_trial()
    # a trial whose first result is already at max_t is past every rung: not judged
    assert report(s, late, 9, [0.0, 0.0, 0.0]) == CONTINUE
    assert report(s, late, 10, [0.0, 0.0, 0.0]) == CONTINUE
    assert late.trial_id not in s.stopped_trials
    assert 9 not in s.milestones


def test_min_mode_objectives_are_negated():
    s = MOASHAScheduler(["acc", "loss"], ["max", "min"], time_attr="training_iteration",
                        grace_period=1, reduction_factor=2, max_t=4)
    a, b, c = make_trial(), make_trial(), make_trial()
    r = lambda tr, acc, loss: s.on_trial_result(None, tr, {"training_iteration": 1, "acc": acc, "loss": loss})
    assert r(a, 0.8, 0.2) == CONTINUE
    assert r(b, 0.8, 0.1) == CONTINUE  # lower loss dominates a
    assert r(c, 0.8, 0.3) == STOP  # higher loss: dominated


def test_missing_time_or_metric_does_not_record():
    s = make_sched()
    tr = make_trial()
    assert s.on_trial_result(None, tr, {"clean_acc": 0.1}) == CONTINUE
    assert s.on_trial_result(None, tr, {"epoch": 1, "clean_acc": 0.1}) == CONTINUE
    assert all(len(r) == 0 for r in s.rung_records().values())


def test_a_finished_trial_keeps_its_rung_records():
    """As in ASHA, a trial that completes, is removed or fails stays recorded at its rungs and
    keeps counting in later decisions; completing records nothing new (Tune replays the final
    result through on_trial_result, which records)."""
    s = make_sched(reduction_factor=2)
    done, failed = make_trial(), make_trial()
    for tr, vec in ((done, [0.9, 0.9, 0.9]), (failed, [0.8, 0.8, 0.8])):
        s.on_trial_add(None, tr)
        assert report(s, tr, 1, vec) == CONTINUE
    s.on_trial_complete(None, done, {"epoch": 2, **dict(zip(OBJ, [0.0, 0.0, 0.0]))})
    s.on_trial_remove(None, done)
    s.on_trial_error(None, failed)
    assert s.rung_records() == {1: {done.trial_id: (0.9, 0.9, 0.9), failed.trial_id: (0.8, 0.8, 0.8)}, 2: {}, 4: {}}
    assert report(s, make_trial(), 1, [0.85, 0.85, 0.85]) == CONTINUE  # position 1 of 3 <= 1/2
    # behind all three: position 3 of 4 > 1/2; were the finished trials dropped, it would be
    # 1 of 2 and continue
    assert report(s, make_trial(), 1, [0.1, 0.1, 0.1]) == STOP


def _filled_scheduler():
    s = make_sched(grace_period=1, reduction_factor=3, max_t=8)
    trials = [make_trial() for _ in range(3)]
    report(s, trials[0], 1, [0.9, 0.9, 0.9])
    report(s, trials[1], 1, [0.1, 0.1, 0.1])  # stopped
    report(s, trials[2], 2, [0.5, 0.5, 0.5])
    return s, trials


def test_the_saved_state_holds_what_a_resume_needs():
    s, trials = _filled_scheduler()
    state = s.get_state()
    assert state == {
        "version": 1, "metrics": OBJ, "modes": ["max"] * 3, "time_attr": "epoch", "milestones": [1, 3],
        "rungs": [(1, {trials[0].trial_id: (0.9, 0.9, 0.9), trials[1].trial_id: (0.1, 0.1, 0.1),
                       trials[2].trial_id: (0.5, 0.5, 0.5)}), (3, {})],
        "stopped_trials": {trials[1].trial_id}, "decisions": s.decisions,
    }


def test_a_scheduler_pickled_before_floors_decides_without_them():
    """A scheduler saved by a version without `violation` (tuner.pkl of an older sweep) has no
    such attribute after unpickling: every vector counts as feasible."""
    s = make_sched(reduction_factor=3)
    del s.__dict__["_violation"]
    report(s, make_trial(), 1, [0.9, 0.7, 0.0])
    assert report(s, make_trial(), 1, [0.1, 0.0, 1.0]) == CONTINUE  # the collapsed extreme is kept
    assert s.decisions[-1]["feasible"] is True


def test_rung_rule_refuses_bad_parameters_with_one_clear_line():
    with pytest.raises(ValueError, match=r"^reduction_factor must be > 1$"):
        RungRule(1.0)
    with pytest.raises(ValueError, match=r"^tie_break 'nope'; accepted: crowding, epsnet$"):
        RungRule(3.0, "nope")
    assert RungRule(1.5).decide([[0.5, 0.5]], [0.4, 0.4]) == (True, 1, 2)  # 1/2 <= 1/1.5
    assert RungRule(3.0).decide([[0.5, 0.5]], [0.4, 0.4]) == (False, 1, 2)  # 1/2 > 1/3


def test_save_restore_roundtrip(tmp_path):
    s, trials = _filled_scheduler()
    path = tmp_path / "moasha.pkl"
    s.save(str(path))
    fresh = make_sched(grace_period=1, reduction_factor=3, max_t=8)
    fresh.restore(str(path))
    assert fresh.stopped_trials == s.stopped_trials == {trials[1].trial_id}
    assert fresh.rung_records() == s.rung_records()
    assert fresh.decisions == s.decisions
    # rung history is used: a new trial at rung 1 in position 2 of 4 is stopped (2/4 > 1/3)
    newcomer = make_trial()
    assert report(fresh, newcomer, 1, [0.3, 0.3, 0.3]) == STOP
    # the restored scheduler itself pickles (tuner.pkl pickles the scheduler)
    again = pickle.loads(pickle.dumps(fresh))
    assert again.rung_records() == fresh.rung_records()


def test_state_callback_roundtrip_and_validation():
    s, _ = _filled_scheduler()
    cb = s.state_callback()
    assert isinstance(cb, MOASHAStateCallback) and cb.scheduler is s
    state = cb.get_state()
    assert state  # truthy, so Tune's CallbackList actually writes it
    fresh = make_sched(grace_period=1, reduction_factor=3, max_t=8)
    fresh.state_callback().set_state(pickle.loads(pickle.dumps(state)))
    assert fresh.rung_records() == s.rung_records()
    other = MOASHAScheduler(["a", "b"], "max", max_t=8)
    with pytest.raises(ValueError):
        other.set_state(state)
    # scheduler and callback pickled together keep pointing at each other (as in tuner.pkl)
    s2, cb2 = pickle.loads(pickle.dumps((s, cb)))
    assert cb2.scheduler is s2


def test_constructor_validation():
    with pytest.raises(ValueError):
        MOASHAScheduler(OBJ, ["max", "max"], max_t=8)
    with pytest.raises(ValueError):
        MOASHAScheduler(OBJ, ["max", "up", "max"], max_t=8)
    with pytest.raises(ValueError):
        MOASHAScheduler(OBJ, "max", reduction_factor=1, max_t=8)
    with pytest.raises(ValueError):
        MOASHAScheduler(OBJ, "max", grace_period=0, max_t=8)
    with pytest.raises(ValueError):
        MOASHAScheduler(OBJ, "max", max_t=8, tie_break="random")
    assert MOASHAScheduler(OBJ, "max", max_t=8).modes == ["max"] * 3


# ----------------------------------------------------------------------- messages and plumbing
# The scheduler's warnings and errors are its interface to the user (one clear line each), and
# its state is what a resumed sweep continues from: both are checked exactly here.


@pytest.mark.parametrize("kw, message", [
    (dict(metrics=[]), "metrics must name at least one objective"),
    (dict(metrics=["a", "a"]), "duplicate metric names: ['a', 'a']"),
    (dict(modes=["max", "max"]), "2 modes for 3 metrics"),
    (dict(modes=["max", "up", "min"]), "modes must be 'max' or 'min'; got ['up']"),
    (dict(grace_period=0), "grace_period must be positive"),
    (dict(reduction_factor=1), "reduction_factor must be > 1"),
    (dict(max_t=0), "max_t must be positive"),
    (dict(max_t=None), "max_t must be positive"),
    (dict(tie_break="random"), "tie_break 'random'; accepted: crowding, epsnet"),
])
def test_constructor_refuses_bad_arguments_with_one_clear_line(kw, message):
    args = dict(metrics=OBJ, modes="max", max_t=8)
    args.update(kw)
    with pytest.raises(ValueError) as err:
        MOASHAScheduler(**args)
    assert str(err.value) == message


def test_defaults_and_the_smallest_budget():
    s = MOASHAScheduler(OBJ, "max", max_t=30)  # epoch, grace 1, eta 3
    assert s.milestones == [1, 3, 9, 27]
    tr = make_trial()
    assert report(s, tr, 1, [0.5, 0.5, 0.5]) == CONTINUE and tr.trial_id in s.rung_records()[1]
    assert MOASHAScheduler(OBJ, "max", max_t=1).milestones == []  # max_t = 1 is a budget


def test_single_metric_and_mode_strings_are_accepted():
    s = MOASHAScheduler("clean_acc", "min", max_t=8)
    assert s.metrics == ["clean_acc"] and s.modes == ["min"] and s.metric == "clean_acc"
    assert s._mode == "min"


def test_no_rungs_is_warned_and_shown(caplog):
    with caplog.at_level("WARNING", logger="search.optimizer"):
        s = MOASHAScheduler(OBJ, "max", grace_period=4, max_t=4)
    assert s.milestones == []
    assert caplog.messages == ["MOASHAScheduler: grace_period=4 >= max_t=4, so there are no rungs and "
                               "no trial will be stopped early."]
    assert s.debug_string() == ("Using MO-ASHA (clean_acc:max, robust_acc:max, channel_sparsity:max): "
                                "num_stopped=0; no rungs")
    assert report(s, make_trial(), 2, [0.0, 0.0, 0.0]) == CONTINUE


def test_debug_string_counts_records_per_rung():
    s = MOASHAScheduler(["acc", "loss"], ["max", "min"], grace_period=1, reduction_factor=3, max_t=27)
    a, b = make_trial(), make_trial()
    s.on_trial_result(None, a, {"epoch": 1, "acc": 0.9, "loss": 0.1})
    s.on_trial_result(None, b, {"epoch": 1, "acc": 0.1, "loss": 0.9})  # stopped
    s.on_trial_result(None, a, {"epoch": 3.5, "acc": 0.9, "loss": 0.1})
    assert s.debug_string() == ("Using MO-ASHA (acc:max, loss:min): num_stopped=1; "
                                "t>=1: 2 recorded | t>=3: 1 recorded | t>=9: 0 recorded")
    assert s.decisions[-1] == {"trial_id": a.trial_id, "milestone": 3, "time": 3.5,
                               "values": {"acc": 0.9, "loss": 0.1}, "feasible": True, "position": 0,
                               "n": 1, "n_keep": 1, "decision": CONTINUE}
    # positions 0 .. n_keep - 1 continue: floor(n / eta) + 1 of n, exactly 2 of 3 at eta = 3
    s.on_trial_result(None, make_trial(), {"epoch": 1, "acc": 0.5, "loss": 0.5})
    assert [d["n_keep"] for d in s.decisions] == [1, 1, 1, 2]
    assert [d["n"] for d in s.decisions] == [1, 2, 1, 3]


def test_a_stop_is_logged_with_its_reasons(caplog):
    s = make_sched(reduction_factor=2)
    a, b = make_trial(), make_trial()
    with caplog.at_level("INFO", logger="search.optimizer"):
        report(s, a, 1.5, [0.9, 0.9, 0.9])
        report(s, make_trial(), 1, [0.8, 0.8, 0.8])
        assert report(s, b, 1.5, [0.1, 0.1, 0.1]) == STOP
    assert caplog.messages == [f"MOASHAScheduler: stopping trial {b.trial_id} at epoch=1.5 (rung 1, "
                               "position 2, keep 2 of 3)"]


def test_min_objectives_are_negated_not_rescaled():
    """The eps-net measures Euclidean distances, so a 'min' objective must enter as -value, at
    the scale of the 'max' ones (a rung found by search where a rescaled column decides otherwise)."""
    prev = [[0.4, 0.1, 0.1], [0.6, 1.0, 0.3], [0.2, 0.6, 0.3], [0.0, 0.1, 0.9]]
    new = [0.1, 0.6, 0.4]
    signs = np.array([1.0, -1.0, 1.0])
    expected = decide(np.array(prev) * signs, np.array(new) * signs, 2, "epsnet")
    assert expected is False
    s = make_sched(modes=["max", "min", "max"], tie_break="epsnet")
    for vec in prev:
        report(s, make_trial(), 1, vec)
    assert report(s, make_trial(), 1, new) == STOP


def test_missing_time_or_metric_is_warned_once_per_key(caplog):
    s = make_sched()
    tr = make_trial()
    with caplog.at_level("WARNING", logger="search.optimizer"):
        for _ in range(2):
            assert s.on_trial_result(None, tr, {"clean_acc": 0.1}) == CONTINUE
            assert s.on_trial_result(None, tr, {"epoch": 1, "clean_acc": 0.1, "robust_acc": "x"}) == CONTINUE
            assert s.on_trial_result(None, tr, {"epoch": 1, "clean_acc": 0.1, "robust_acc": 0.1}) == CONTINUE
    assert caplog.messages == [
        "MOASHAScheduler: result has no 'epoch'; no rung decision made.",
        "MOASHAScheduler: result has no numeric 'robust_acc' (got 'x'); no rung decision made.",
        "MOASHAScheduler: result has no numeric 'channel_sparsity' (got None); no rung decision made.",
    ]
    assert all(len(r) == 0 for r in s.rung_records().values())


def test_set_search_properties_with_lists():
    s = make_sched(modes=["max", "min", "max"])
    assert s.set_search_properties(["clean_acc", "robust_acc"], ["max", "min"]) is True
    assert s.set_search_properties(["clean_acc", "robust_acc"], None) is True
    assert s.set_search_properties(["clean_acc", "robust_acc"], "max") is False  # robust_acc is min
    assert s.set_search_properties(["clean_acc", "robust_acc"], ["max", "max"]) is False
    assert s.set_search_properties(["clean_acc", "loss"], None) is False
    assert s.set_search_properties("robust_acc", None) is True


def test_the_scheduler_uses_its_tie_break():
    """A rung where crowding keeps the newcomer and the eps-net stops it (found by search)."""
    prev = [[0.4, 0.0, 0.1], [0.7, 0.6, 0.6], [0.4, 1.0, 1.0], [0.7, 0.7, 0.7]]
    new = [0.4, 0.1, 0.7]
    assert decide(prev, new, 2, "crowding") and not decide(prev, new, 2, "epsnet")
    for tie_break, expected in (("crowding", CONTINUE), ("epsnet", STOP)):
        s = make_sched(tie_break=tie_break)
        for vec in prev:
            report(s, make_trial(), 1, vec)
        assert report(s, make_trial(), 1, new) == expected


def test_set_state_checks_version_and_objectives_and_warns_on_other_rungs(caplog):
    s, trials = _filled_scheduler()
    state = s.get_state()
    fresh = make_sched(grace_period=1, reduction_factor=3, max_t=8)
    with pytest.raises(ValueError) as err:
        fresh.set_state({**state, "version": 0})
    assert str(err.value) == "unsupported MOASHAScheduler state version 0"
    modes_only = make_sched(grace_period=1, reduction_factor=3, max_t=8, modes=["max", "max", "min"])
    with pytest.raises(ValueError) as err:
        modes_only.set_state(state)  # same metrics, another mode
    assert str(err.value) == (
        "saved MO-ASHA state is for metrics ['clean_acc', 'robust_acc', 'channel_sparsity'] / modes "
        "['max', 'max', 'max'], this scheduler has ['clean_acc', 'robust_acc', 'channel_sparsity'] / "
        "['max', 'max', 'min']")
    with caplog.at_level("WARNING", logger="search.optimizer"):
        fresh.set_state(state)  # same rungs: nothing to say
        assert caplog.messages == []
        other = make_sched(grace_period=1, reduction_factor=2, max_t=8)  # rungs 1, 2, 4
        other.set_state(state)
    assert caplog.messages == ["MOASHAScheduler: restoring rungs [1, 3] into a scheduler configured "
                               "with [1, 2, 4]; adopting the saved rungs."]
    assert other.milestones == [1, 3] and other.rung_records() == s.rung_records()
    assert other.stopped_trials == {trials[1].trial_id}


def test_rung_position_and_decide_refuse_bad_shapes_with_one_line():
    cases = [
        (lambda: rung_position([[0.1, 0.2]], tie_break="random"), "tie_break 'random'; accepted: crowding, epsnet"),
        (lambda: rung_position([]), "points must have shape (n, k), n >= 1; got (0,)"),
        (lambda: rung_position([0.1, 0.2]), "points must have shape (n, k), n >= 1; got (2,)"),
        (lambda: decide([[0.1, 0.2], [0.3, 0.4]], [0.1, 0.2, 0.3], 3),
         "rung vectors of shape (2, 2) do not match a new vector of length 3"),
        (lambda: rung_position([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], violations=[0.0, 0.0]),
         "2 violations for 3 points"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
    assert rung_position([[0.1, 0.2], [0.3, 0.4]], index=0) == 1  # index counts from the front too
    with pytest.raises(ValueError, match=r"n >= 1; got \(0, 2\)"):
        rung_position(np.zeros((0, 2)))  # no rows, even with the right number of objectives


def test_a_nan_violation_is_the_largest():
    """An unknown violation (NaN) ranks behind every infeasible vector with a known one."""
    pts = [[0.9, 0.9], [0.5, 0.5], [0.4, 0.4], [0.8, 0.8]]
    assert rung_position(pts, -1, violations=[0.0, 0.5, 0.2, np.nan]) == 3
    assert rung_position(pts, 1, violations=[0.0, 0.5, 0.2, np.nan]) == 2


def test_rung_position_leaves_its_input_alone():
    """NaN and inf are mapped on a copy: the caller's array (e.g. recorded rung vectors) keeps them."""
    pts = np.array([[0.5, np.nan], [np.inf, 0.1], [0.2, 0.3]])
    before = pts.copy()
    for tie_break in ("crowding", "epsnet"):
        rung_position(pts, 0, tie_break)
    np.testing.assert_array_equal(pts, before)
