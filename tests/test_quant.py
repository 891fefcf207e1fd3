"""Binary-Relax projections and the relaxed/quantized training weights (algorithms.md section 1)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import QuantConfig
from trainables.models import build_model
from trainables.quant import (
    BinaryRelax,
    _State,
    cached,
    project_binary,
    project_multibit,
    project_ternary_exact,
    project_ternary_twn,
    projector,
    quantize_,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# projections


def test_binary_scale_is_mean_abs():
    w = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0])
    # mean|w| over all five entries (the zero counts) = 10/5; sign(0) = 0 keeps the zero
    assert torch.equal(project_binary(w), torch.tensor([2.0, -2.0, 2.0, -2.0, 0.0]))
    for seed in range(5):
        w = torch.randn(16, 8, 3, 3, generator=_gen(seed))
        p = project_binary(w)
        assert torch.allclose(p, w.abs().mean() * torch.sign(w))
        assert torch.allclose(p.abs(), torch.full_like(p, float(w.abs().mean())))


def test_ternary_threshold_rule():
    w = torch.tensor([0.1, -1.0, 2.0, -0.5, 0.0])
    # mean|w| = 0.72, threshold 0.504: only -1 and 2 survive; scale = (1 + 2) / n with n = 5
    assert torch.allclose(project_ternary_twn(w), torch.tensor([0.0, -0.6, 0.6, 0.0, 0.0]))
    for seed in range(5):
        w = torch.randn(8, 4, 3, 3, generator=_gen(seed))
        a = w.abs()
        support = a >= 0.7 * a.mean()
        scale = a[support].sum() / w.numel()  # reference scale: divided by n, not by |S|
        expected = torch.where(support, scale * torch.sign(w), torch.zeros_like(w))
        assert torch.allclose(project_ternary_twn(w), expected)
    # an entry exactly at the threshold is kept (|w| >= 0.7 mean|w|, the reference's rule):
    # mean|w| = 10, threshold 7.0 (float32 0.7 * 10 rounds to 7 exactly)
    w = torch.tensor([7.0, -13.0, 10.0])
    assert float(0.7 * w.abs().mean()) == 7.0
    assert torch.equal(project_ternary_twn(w), torch.tensor([10.0, -10.0, 10.0]))


def _brute_force_ternary_error(w: np.ndarray) -> float:
    """min over every q in {-1,0,1}^n (q != 0) and delta > 0 of ||delta q - w||^2."""
    q = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=len(w))))
    q = q[np.abs(q).sum(1) > 0]
    wq = q @ w
    qq = (q * q).sum(1)
    gain = np.where(wq > 0, wq * wq / qq, 0.0)  # optimal delta = <w,q>/<q,q> when positive
    return float(w @ w - gain.max())


@pytest.mark.parametrize("n", range(1, 9))
def test_exact_ternary_is_optimal(n):
    rng = np.random.default_rng(n)
    for _ in range(6):
        w = rng.standard_normal(n)
        p = project_ternary_exact(torch.tensor(w)).numpy()
        # of the form delta * q with q ternary
        mags = np.unique(np.abs(p[p != 0]))
        assert len(mags) == 1 and mags[0] > 0
        assert np.all(np.sign(p[p != 0]) == np.sign(w[p != 0]))
        err = float(((p - w) ** 2).sum())
        assert err == pytest.approx(_brute_force_ternary_error(w), rel=1e-9, abs=1e-12)
    # the reference 0.7 rule is a heuristic: never better than the exact projection
    for _ in range(20):
        w = torch.tensor(rng.standard_normal(n))
        e_exact = float(((project_ternary_exact(w) - w) ** 2).sum())
        e_twn = float(((project_ternary_twn(w) - w) ** 2).sum())
        assert e_exact <= e_twn + 1e-12


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("lloyd_iters", [1, 3])
def test_multibit_level_count(bits, lloyd_iters):
    K = 2 ** (bits - 1) - 1
    # uniform magnitudes hit every level, so an extra level would show up
    w = torch.empty(40_000).uniform_(-1, 1, generator=_gen(bits))
    p = project_multibit(w, bits, lloyd_iters)
    values = torch.unique(p)
    assert len(values) <= 2**bits - 1
    assert len(values) >= 2**bits - 3  # and the grid is really used
    # symmetric integer levels -K..K times one scale
    s = values.abs().max() / K
    k = p / s
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert int(k.round().abs().max()) == K
    assert torch.equal(projector(QuantConfig(bits=bits, lloyd_iters=lloyd_iters))(w), p)


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
def test_lloyd_iterations_never_raise_the_error(bits):
    strictly_lower = 0
    for seed in range(8):
        g = _gen(seed)
        base = torch.randn(4096, generator=g, dtype=torch.float64)
        if seed % 2:  # heavy tail: the max-based grid is far from optimal here
            base = base ** 3
        errors = [float(((project_multibit(base, bits, it) - base) ** 2).sum()) for it in range(1, 6)]
        for before, after in zip(errors, errors[1:]):
            assert after <= before * (1 + 1e-12)
        strictly_lower += errors[-1] < errors[0] * (1 - 1e-6)
    assert strictly_lower > 0  # the iterations do something


def test_one_lloyd_step_by_default_and_the_second_one_refits():
    """Default: one step (the reference's max-based grid and a least-squares scale); a second
    step re-assigns to the nearest level of that scale and, on heavy-tailed weights, lowers the
    error. A weight with a single non-zero entry is in the set at every width: it projects to itself."""
    for seed in range(2):
        w = torch.randn(4096, generator=_gen(seed), dtype=torch.float64) ** 3
        one = project_multibit(w, 4)
        assert torch.equal(one, project_multibit(w, 4, 1))
        e1 = float(((one - w) ** 2).sum())
        e2 = float(((project_multibit(w, 4, 2) - w) ** 2).sum())
        assert e2 < e1 * (1 - 1e-3)
    w = torch.tensor([0.0, -0.7, 0.0, 0.0], dtype=torch.float64)
    for bits in range(2, 9):  # K = 1 at two bits: the level-1 entry must keep its scale
        assert torch.allclose(project_multibit(w, bits), w, rtol=1e-12, atol=0), bits


@pytest.mark.parametrize("config", [QuantConfig(bits=b) for b in (1, 2, 3, 4, 5, 6, 7, 8)]
                         + [QuantConfig(bits=2, ternary_mode="exact"), QuantConfig(bits=4, lloyd_iters=5)],
                         ids=lambda c: f"b{c.bits}-{c.ternary_mode}-{c.lloyd_iters}")
def test_all_zero_tensor_projects_to_zeros(config):
    w = torch.zeros(4, 3, 3, 3)
    p = projector(config)(w)
    assert not torch.isnan(p).any()
    assert torch.equal(p, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------
# relaxed weights, phases and the straight-through gradient


def _quantized_model(bits=2, **kw):
    torch.manual_seed(0)
    model = build_model(8, 4, 3, 10, 1, 0.0)
    br = quantize_(model, QuantConfig(bits=bits, **kw))
    return model, br


def _weights_seen_in_forward(model, modules, x):
    seen = {}

    def hook(m, inputs):
        seen[id(m)] = m.weight.detach().clone()

    handles = [m.register_forward_pre_hook(hook) for _, m in modules]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[id(m)] for _, m in modules]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_relaxed_weights_interpolate_and_phase2_is_quantized(bits):
    model, br = _quantized_model(bits, lambda0=0.5, rho=1.1, phase2_start=0.75, lambda_schedule="rho")
    assert len(br.modules) == 7  # stem + 2 convs in each of 3 blocks; the 1x1 shortcuts stay float
    project = projector(br.config)
    x = torch.rand(2, 3, 32, 32)
    br.start_epoch(1, 8)
    lam = br.lam
    assert lam == pytest.approx(0.5 * 1.1**2)
    assert br.state.mode == "relaxed"
    used = _weights_seen_in_forward(model, br.modules, x)
    for w, u in zip(br.float_weights(), used):
        w = w.detach()
        p = project(w)
        assert torch.allclose(u, (w + lam * p) / (1 + lam), atol=1e-7)
        lo, hi = torch.minimum(w, p), torch.maximum(w, p)
        assert bool(((u >= lo - 1e-7) & (u <= hi + 1e-7)).all())
        assert not torch.allclose(u, p) and not torch.allclose(u, w)
    br.start_epoch(6, 8)  # phase II starts at round(0.75 * 8) = 6
    assert br.state.mode == "quantized"
    for w, u in zip(br.float_weights(), _weights_seen_in_forward(model, br.modules, x)):
        assert torch.equal(u, project(w.detach()))


@pytest.mark.parametrize("epoch", [0, 3])  # relaxed, then hard-quantized
def test_straight_through_gradient_reaches_float_weights(epoch):
    model, br = _quantized_model(2, phase2_start=0.75)
    br.start_epoch(epoch, 4)
    model.train()
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    used = {}

    def keep(mod, inputs, out):  # the weight tensor each conv actually used
        out.retain_grad()
        used[id(mod)] = out

    hooks = [m.parametrizations.weight[0].register_forward_hook(keep) for _, m in br.modules]
    try:
        with cached():
            F.cross_entropy(model(x), y).backward()
    finally:
        for h in hooks:
            h.remove()
    for _, m in br.modules:
        g = m.parametrizations.weight.original.grad
        assert g is not None and g.abs().sum() > 0
        # straight-through: dL/dw is dL/du unchanged (no 1/(1+lam) factor, no masking)
        assert torch.equal(g, used[id(m.parametrizations.weight[0])].grad)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_cached_weights_from_a_no_grad_forward_still_pass_gradients(bits):
    """A past root cause (TRADES trained no conv weight): a forward under no_grad (TRADES' natural forward) inside the
    per-step cache must not hand a detached weight to the training forward that follows."""
    model, br = _quantized_model(bits)
    br.start_epoch(0, 4)
    model.train()
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    calls = []
    for _, m in br.modules:
        pz = m.parametrizations.weight[0]
        orig = pz._compute_target
        pz._compute_target = lambda w, orig=orig: calls.append(1) or orig(w)
    with cached():
        with torch.no_grad():
            model(x)
        F.cross_entropy(model(x), y).backward()
    assert len(calls) == len(br.modules)  # the projection was still computed once per layer
    for w in br.float_weights():
        assert w.grad is not None and w.grad.abs().sum() > 0


def test_cache_lives_one_block_and_follows_the_phase():
    model, br = _quantized_model(2)
    br.start_epoch(0, 4)
    x = torch.rand(2, 3, 16, 16)
    project = projector(br.config)
    with cached():
        before = _weights_seen_in_forward(model, br.modules, x)
        br.start_epoch(3, 4)  # phase II inside the block: the target follows the mode
        hard = _weights_seen_in_forward(model, br.modules, x)
    with torch.no_grad():
        for w in br.float_weights():
            w.mul_(-2.0)  # what an optimizer or proximal step does, between blocks
    with cached():
        after = _weights_seen_in_forward(model, br.modules, x)
    for w, u0, u1, u2 in zip(br.float_weights(), before, hard, after):
        assert not torch.allclose(u0, u1)
        assert torch.allclose(u1, project(w.detach() / -2.0))
        assert torch.allclose(u2, project(w.detach()))  # the next block sees the new weights


def test_straight_through_gradient_single_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, bias=False)
    br = quantize_(conv, QuantConfig(bits=4))
    br.start_epoch(0, 10)
    x, r = torch.randn(2, 2, 5, 5), torch.randn(2, 3, 3, 3)
    (conv(x) * r).sum().backward()
    u = conv.weight.detach().clone().requires_grad_(True)
    (F.conv2d(x, u) * r).sum().backward()
    assert torch.allclose(conv.parametrizations.weight.original.grad, u.grad, atol=1e-6)


def _schedule(**kw):
    """A schedule handle without a model: the phase and lambda rules read only the config."""
    return BinaryRelax(QuantConfig(bits=2, **kw), [], _State(lam=QuantConfig(**kw).lambda0))


def test_phase2_epoch_rules():
    for epochs in range(1, 12):
        for start in (0.0, 0.1, 0.5, 0.6, 0.75, 0.9, 0.99):
            br = _schedule(phase2_start=start)
            m = br.phase2_epoch(epochs)
            assert 0 <= m <= epochs - 1  # at least the last epoch is hard-quantized
            modes = []
            for e in range(epochs):
                br.start_epoch(e, epochs)
                modes.append(br.state.mode)
            assert modes == ["relaxed"] * m + ["quantized"] * (epochs - m)
        br = _schedule(phase2_start=1.0)
        assert br.phase2_epoch(epochs) == epochs
        for e in range(epochs):
            br.start_epoch(e, epochs)
            assert br.state.mode == "relaxed"
    _, br = _quantized_model(2, phase2_start=0.5)
    assert br.phase2_epoch(2) == 1
    assert br.phase2_epoch(200) == 100


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 8, 12, 200])
@pytest.mark.parametrize("steps_per_epoch", [1, 9, 50])
def test_final_schedule_reaches_lambda_final_at_phase2(epochs, steps_per_epoch):
    """Geometric growth per optimizer step from lambda0 to lambda_final at the start of phase II,
    whatever the run length (the default schedule)."""
    _, br = _quantized_model(2, lambda0=0.5, lambda_final=300.0)
    assert br.config.lambda_schedule == "final"
    m = br.phase2_epoch(epochs)
    lams = []
    for e in range(epochs):
        br.start_epoch(e, epochs, steps_per_epoch)
        for s in range(steps_per_epoch):
            br.start_step(s)
            lams.append((br.state.mode, br.lam))
    phase1 = [lam for mode, lam in lams if mode == "relaxed"]
    assert len(phase1) == m * steps_per_epoch
    if phase1:
        assert phase1[-1] == pytest.approx(300.0)
        assert phase1[0] == pytest.approx(0.5 * 600.0 ** (1 / len(phase1)))  # the first step grows
        ratios = [b / a for a, b in zip(phase1, phase1[1:])]
        assert all(r == pytest.approx(ratios[0]) for r in ratios)  # geometric, per step
    assert all(lam == pytest.approx(300.0) for mode, lam in lams if mode == "quantized")


@pytest.mark.parametrize("epochs", [4, 12])
def test_default_schedule_is_near_hard_quantization_at_phase2(epochs):
    _, br = _quantized_model(2)
    m = br.phase2_epoch(epochs)
    br.start_epoch(m - 1, epochs, 9)
    br.start_step(8)
    assert br.lam >= 99  # relaxed weights are >= 99 % projection when phase II starts
    assert br.config.lambda_final >= 100


def test_rho_schedule_is_per_epoch():
    _, br = _quantized_model(2, lambda0=2.0, rho=1.05, lambda_schedule="rho")
    for e in range(5):
        br.start_epoch(e, 10, 7)
        for s in range(7):
            br.start_step(s)
            assert br.lam == pytest.approx(2.0 * 1.05 ** (e + 1))


@pytest.mark.parametrize("kw, needle", [
    (dict(lambda_schedule="nope"), "lambda_schedule='nope'"),
    (dict(lambda0=2.0, lambda_final=1.0), "lambda_final=1.0"),
])
def test_bad_schedules_are_refused(kw, needle):
    from trainables.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        QuantConfig(**kw).validate()


def test_binary_size_counts_the_zero_mask_a_deployed_file_stores():
    from trainables.quant import layer_bits, model_bits

    conv = nn.Conv2d(4, 6, 3, bias=False)
    br = quantize_(conv, QuantConfig(bits=1))
    w = br.float_weights()[0]
    n = w.numel()
    assert model_bits(conv, br) == (n + 32, n)  # no zeros: signs and a scale
    with torch.no_grad():
        w[1:3] = 0  # two output filters zeroed by the proximal step
    assert model_bits(conv, br)[0] == n + 32 + 6  # + one mask bit per output filter
    with torch.no_grad():
        w.normal_()
        w[:, 2] = 0  # an input channel (group_axis=in)
    assert model_bits(conv, br)[0] == n + 32 + 4
    with torch.no_grad():
        w.normal_()
        w[0, 0, 0, 0] = 0  # a scattered zero: a mask bit per entry (the ternary cost)
    assert model_bits(conv, br)[0] == 2 * n + 32
    fc = torch.ones(5, 8)  # a binary fully connected layer (quantize_fc) with one zeroed row
    fc[3] = 0
    assert layer_bits(fc, 1) == 40 + 32 + 5
    fc[:, 1] = 0  # zeros in a row and a column: one mask bit per entry
    assert layer_bits(fc, 1) == 2 * 40 + 32
    assert layer_bits(torch.tensor([1.0, 0.0, -1.0]), 1) == 3 + 32  # 1-D: no groups, signs only
    q = torch.zeros(6, 4, 3, 3)
    q[0] = 1.0
    for bits in (2, 4):  # zero is an ordinary level at 2+ bits
        assert layer_bits(q, bits) == bits * q.numel() + 32


def test_export_state_dict_holds_the_projected_weights_under_plain_keys():
    from trainables.quant import distinct_values, export_state_dict

    model, br = _quantized_model(2, quantize_fc=True)
    br.start_epoch(0, 4)  # relaxed: the export is still proj(w)
    sd = export_state_dict(model, br)
    assert not any("parametrizations" in k for k in sd)
    plain = build_model(8, 4, 3, 10, 1, 0.0)
    assert set(sd) == set(plain.state_dict())  # loads into an unquantized model as is
    project = projector(br.config)
    for name, m in br.modules:
        w = m.parametrizations.weight.original.detach()
        assert torch.equal(sd[f"{name}.weight"], project(w))
        assert distinct_values(sd[f"{name}.weight"]) <= 3
    for name, p in model.named_parameters():  # everything else is copied as it is
        if "parametrizations" not in name:
            assert torch.equal(sd[name], p.detach())
    for name, b in model.named_buffers():
        assert torch.equal(sd[name], b)
    plain.load_state_dict(sd)
    model.eval()
    plain.eval()
    x = torch.rand(2, 3, 8, 8)
    with br.quantized(), torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-6)
    conv = nn.Conv2d(2, 3, 3)  # a model that is itself the quantized layer: keys without a prefix
    cbr = quantize_(conv, QuantConfig(bits=1))
    csd = export_state_dict(conv, cbr)
    assert set(csd) == {"weight", "bias"}
    assert torch.equal(csd["weight"], project_binary(cbr.float_weights()[0].detach()))
    assert distinct_values(torch.tensor([0.0, 1.0, 1.0, -1.0])) == 3


def test_schedule_state_round_trips():
    _, br = _quantized_model(2, phase2_start=0.5)
    br.start_epoch(3, 4, 5)
    br.start_step(2)
    state = br.state_dict()
    assert state == {"lam": br.lam, "mode": "quantized"}
    _, other = _quantized_model(2, phase2_start=0.5)
    assert other.state.mode == "relaxed" and other.lam != br.lam
    other.load_state_dict({"lam": 7, "mode": "quantized"})
    assert other.lam == 7.0 and isinstance(other.lam, float) and other.state.mode == "quantized"
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_layer_selection_follows_the_flags():
    """depth 8: a stem, three blocks of two 3x3 convolutions, two 1x1 shortcuts (the widening
    blocks) and a classifier, per ensemble member."""
    def chosen(**kw):
        torch.manual_seed(0)
        model = build_model(8, 4, 3, 10, 2, 0.0)
        mods = [m for _, m in quantize_(model, QuantConfig(bits=2, **kw)).modules]
        return (sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in mods),
                sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in mods),
                sum(isinstance(m, nn.Linear) for m in mods), len(mods))

    assert chosen() == (14, 0, 0, 14)
    assert chosen(quantize_stem=False) == (12, 0, 0, 12)
    assert chosen(quantize_shortcut=True) == (14, 4, 0, 18)
    assert chosen(quantize_fc=True) == (14, 0, 2, 16)


def test_projector_follows_bits_and_ternary_mode():
    w = torch.randn(64, generator=_gen(0))
    assert torch.equal(projector(QuantConfig(bits=32))(w), w)  # float: the identity, exactly
    w = torch.tensor([4.0, -3.0, 1.0, -0.5, 0.25])
    assert torch.equal(projector(QuantConfig(bits=1))(w), project_binary(w))
    exact = projector(QuantConfig(bits=2, ternary_mode="exact"))(w)
    twn = projector(QuantConfig(bits=2, ternary_mode="twn0.7"))(w)
    # the two ternary rules differ on this w, so each mode is seen to pick its own
    assert torch.equal(exact, project_ternary_exact(w)) and torch.equal(twn, project_ternary_twn(w))
    assert not torch.equal(exact, twn)


def test_outside_a_cached_block_every_forward_sees_the_current_weights():
    """Only a cached block reuses targets: after one has been left, a weight changed in place
    (same storage, same lambda, as an optimizer step with the rho schedule) is seen at once."""
    model, br = _quantized_model(2, lambda_schedule="rho")
    br.start_epoch(0, 4)
    x = torch.rand(2, 3, 16, 16)
    with cached():
        _weights_seen_in_forward(model, br.modules, x)
    before = _weights_seen_in_forward(model, br.modules, x)
    with torch.no_grad():
        for w in br.float_weights():
            w.mul_(2.0)  # relaxed u and proj are both homogeneous: u doubles
    after = _weights_seen_in_forward(model, br.modules, x)
    for u0, u1 in zip(before, after):
        assert torch.allclose(u1, 2.0 * u0)


def test_quantize_starts_at_lambda0_and_hangs_the_handle_on_the_model():
    model, br = _quantized_model(2, lambda0=0.5)
    assert br.lam == 0.5 and model.binary_relax is br


def test_start_epoch_sets_the_lambda_of_the_epochs_first_step():
    _, br = _quantized_model(2, lambda0=0.5, lambda_final=300.0)
    br.start_epoch(1, 8, 5)
    assert br.lam == br.lam_at(1, 0, 8, 5) != br.lam_at(1, 1, 8, 5)
    br.start_epoch(1, 8)  # one optimizer step per epoch unless told
    assert br.lam == br.lam_at(1, 0, 8, 1) != br.lam_at(1, 0, 8, 2)
    br.start_step(0)
    assert br.lam == br.lam_at(1, 0, 8, 1)


def test_exclude_from_compile_wraps_the_target_once(monkeypatch):
    """--compile leaves the BR target to eager mode: wrapped by torch.compiler.disable, once
    however often it is asked (the class attribute is restored afterwards)."""
    from trainables import quant

    original = quant._BRWeight.target
    monkeypatch.setattr(quant._BRWeight, "target", original)
    quant.exclude_from_compile()
    wrapped = quant._BRWeight.target
    assert wrapped is not original and wrapped._brs_eager is True
    assert wrapped._torchdynamo_disable and wrapped._torchdynamo_orig_callable is original
    quant.exclude_from_compile()
    assert quant._BRWeight.target is wrapped
