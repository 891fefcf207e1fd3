"""Group penalty / proximal step (algorithms.md 3.3) and the structure metrics (section 5)."""

import copy

import pytest
import torch

from trainables.config import QuantConfig
from trainables.losses import GROUP_EPS, group_norms, group_penalty, group_prox_
from trainables.metrics import channel_sparsity, structure_metrics, weight_sparsity
from trainables.models import build_model
from trainables.quant import model_bits, quantize_

DIMS = {"out": (1, 2, 3), "in": (0, 2, 3)}


# ------------------------------------------------------------------------------------------
# group lasso


@pytest.mark.parametrize("axis", ["out", "in"])
def test_group_penalty_gradient(axis):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64),
          torch.randn(5, 6, 1, 1, generator=g, dtype=torch.float64)]
    ws[0][2 if axis == "out" else slice(None), 1 if axis == "in" else slice(None)] = 0.0  # a dead group
    fc = torch.randn(10, 5, generator=g, dtype=torch.float64)  # not 4-D: not penalised
    ws = [w.requires_grad_(True) for w in ws]
    fc.requires_grad_(True)
    r = group_penalty(ws + [fc], axis)
    expected_value = sum(torch.sqrt((w * w).sum(DIMS[axis]) + GROUP_EPS).sum() for w in ws)
    assert r.item() == pytest.approx(expected_value.item(), rel=1e-12)
    r.backward()
    for w in ws:
        norm = torch.sqrt((w.detach() ** 2).sum(DIMS[axis], keepdim=True) + 1e-8)
        assert torch.allclose(w.grad, w.detach() / norm, rtol=1e-10, atol=1e-12)
    assert fc.grad is None
    # a single layer, and the default axis: groups are output filters
    one = ws[0].detach()
    assert group_penalty([one]).item() == pytest.approx(
        torch.sqrt((one * one).sum((1, 2, 3)) + GROUP_EPS).sum().item(), rel=1e-12)
    assert torch.equal(group_norms(one), group_norms(one, "out"))
    # the dead group gets a zero (not NaN) gradient thanks to the 1e-8
    assert torch.isfinite(ws[0].grad).all()


@pytest.mark.parametrize("axis", ["out", "in"])
def test_group_prox_zeroes_small_groups_and_shrinks_the_rest(axis):
    step = 0.5
    # five groups with norms 0.3, 0.5 (= step), 1.0, 2.0, 5.0 along the chosen axis
    norms = torch.tensor([0.3, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    base = torch.zeros(5, 3, 2, 2, dtype=torch.float64)
    base[:, 0, 0, 0] = 0.6
    base[:, 1, 1, 1] = -0.8  # each group direction has unit norm
    w = base * norms[:, None, None, None]
    if axis == "in":
        w = w.transpose(0, 1).contiguous()  # groups now run along dim 1
    before = w.clone()
    group_prox_([w], step, axis)
    group_norms = torch.sqrt((before ** 2).sum(DIMS[axis]))
    assert torch.allclose(group_norms, norms)
    for i, n in enumerate(norms.tolist()):
        sel = (i,) if axis == "out" else (slice(None), i)
        if n <= step:
            assert torch.equal(w[sel], torch.zeros_like(w[sel]))
        else:
            assert torch.allclose(w[sel], before[sel] * (1 - step / n), rtol=1e-12)


# ------------------------------------------------------------------------------------------
# sparsity


def test_weight_sparsity_counts_entries_over_all_layers():
    a = torch.ones(4, 2, 3, 3)
    a[0] = 0  # 18 zeros of 72
    b = torch.ones(2, 4, 1, 1)
    b[1, 1] = 0  # 1 zero of 8
    assert weight_sparsity([a, b]) == pytest.approx(19 / 80)
    assert weight_sparsity([torch.zeros(3, 3, 3, 3)]) == 1.0
    assert weight_sparsity([torch.ones(3, 3, 3, 3)]) == 0.0
    assert weight_sparsity([]) == 0.0  # nothing quantized: no sparsity, not a division by zero


def test_channel_sparsity_out_and_in_are_count_weighted():
    a = torch.randn(4, 3, 3, 3)  # 4 filters, 3 input channels
    a[1] = 0
    a[3] = 0  # 2 of 4 output filters dead
    a[:, 2] = 0  # input channel 2 dead
    a[0, 0, 1, 1] = 0  # an isolated zero kills nothing
    b = torch.randn(8, 4, 3, 3)  # 8 filters, 4 input channels
    b[5] = 0  # 1 of 8 filters dead
    b[:, 0] = 0
    b[:, 3] = 0  # 2 of 4 input channels dead
    # count-weighted: (2 + 1) / (4 + 8); a parameter-weighted average would give another value
    assert channel_sparsity([a, b], "out") == pytest.approx(3 / 12)
    assert channel_sparsity([a, b], "in") == pytest.approx(3 / 7)
    assert channel_sparsity([a], "out") == pytest.approx(0.5)
    assert channel_sparsity([a], "in") == pytest.approx(1 / 3)
    # a filter with one surviving weight is alive
    a[1, 0, 0, 0] = 0.1
    assert channel_sparsity([a], "out") == pytest.approx(0.25)
    assert channel_sparsity([a]) == channel_sparsity([a], "out")  # groups are filters by default
    # a 2-D (fully connected) weight has rows and columns too; 1-D tensors (biases) have none
    fc = torch.randn(5, 6)
    fc[2] = 0
    fc[:, 4] = 0
    bias = torch.zeros(7)
    assert channel_sparsity([bias, fc], "out") == pytest.approx(1 / 5)
    assert channel_sparsity([bias, fc], "in") == pytest.approx(1 / 6)
    assert channel_sparsity([bias]) == 0.0 and channel_sparsity([]) == 0.0


# ------------------------------------------------------------------------------------------
# model size


DOC_BITS = {32: 8_713_024, 1: 415_056, 2: 682_752, 4: 1_218_144}  # algorithms.md section 5.3
DOC_BITS_WITH_SHORTCUTS = {1: 335_760, 2: 606_016, 4: 1_146_528}
N_RESNET20 = 272_282


@pytest.mark.parametrize("bits", sorted(DOC_BITS))
def test_model_size_matches_docs(bits):
    model = build_model(20, 16, 3, 10, ensemble=1, noise=0.1)
    br = quantize_(model, QuantConfig(bits=bits))
    size, n = model_bits(model, br)
    assert (size, n) == (DOC_BITS[bits], N_RESNET20)
    s = structure_metrics(model, br)
    assert s["size_bits"] == DOC_BITS[bits]
    assert s["compression"] == pytest.approx(32 * N_RESNET20 / DOC_BITS[bits])
    assert s["compression"] == pytest.approx({32: 1.0, 1: 20.99, 2: 12.76, 4: 7.15}[bits], abs=5e-3)
    if bits in DOC_BITS_WITH_SHORTCUTS:
        model = build_model(20, 16, 3, 10, ensemble=1, noise=0.1)
        br = quantize_(model, QuantConfig(bits=bits, quantize_shortcut=True))
        assert model_bits(model, br) == (DOC_BITS_WITH_SHORTCUTS[bits], N_RESNET20)


def test_model_size_scales_with_ensemble():
    model = build_model(20, 16, 3, 10, ensemble=2, noise=0.1)
    br = quantize_(model, QuantConfig(bits=2))
    assert model_bits(model, br) == (2 * DOC_BITS[2], 2 * N_RESNET20)
    s = structure_metrics(model, br)
    assert s["compression"] == pytest.approx(32 * N_RESNET20 / DOC_BITS[2])


def test_structure_metrics_use_quantized_weights():
    torch.manual_seed(0)
    model = build_model(8, 8, 3, 10, ensemble=2, noise=0.0)
    br = quantize_(model, QuantConfig(bits=2))
    # float shadow weights have no zeros; their ternary projection has many (0.7 mean|w| rule)
    assert weight_sparsity(br.float_weights()) == 0.0
    s = structure_metrics(model, br)
    assert s["weight_sparsity"] == pytest.approx(weight_sparsity(br.quantized_weights()))
    assert 0.2 < s["weight_sparsity"] < 0.7
    # kill one filter of member 1's stem: channel sparsity sees it through the projection
    with torch.no_grad():
        br.float_weights()[len(br.modules) // 2][3].mul_(1e-3)
    n_filters = sum(w.shape[0] for w in br.quantized_weights())
    n_inputs = sum(w.shape[1] for w in br.quantized_weights())
    s = structure_metrics(model, br)
    assert s["channel_sparsity"] == pytest.approx(1 / n_filters)
    assert s["channel_sparsity_in"] == 0.0
    # and one input channel of a 3x3 conv (group_axis=in)
    with torch.no_grad():
        br.float_weights()[1][:, 2].mul_(1e-3)
    s = structure_metrics(model, br)
    assert s["channel_sparsity"] == pytest.approx(1 / n_filters)
    assert s["channel_sparsity_in"] == pytest.approx(1 / n_inputs)


# ------------------------------------------------------------------------------------------
# accuracy and BN recalibration (the fast layer's own checks; the slow layer trains models)


def _tiny_quantized(seed=0, bits=2):
    torch.manual_seed(seed)
    model = build_model(8, 4, 3, 10, ensemble=1, noise=0.0)  # no noise: every forward is the same
    br = quantize_(model, QuantConfig(bits=bits))
    br.start_epoch(0, 4)  # relaxed training weights: accuracy must still use proj(w)
    return model, br


def _predict(model, br, x):
    model.eval()
    with br.quantized(), torch.no_grad():
        return model(x).argmax(1)


def test_accuracy_is_the_quantized_eval_model_on_every_image():
    from trainables.attacks import perturb
    from trainables.config import AttackConfig
    from trainables.metrics import accuracy

    model, br = _tiny_quantized(seed=1)  # a seed whose untrained net an attack can fool
    x = torch.rand(11, 3, 8, 8)
    pred = _predict(model, br, x)
    y = pred.clone()
    y[6:] = (pred[6:] + 1) % 10  # exactly 6 of 11 right on clean inputs
    with torch.no_grad():  # relaxed weights, or batch statistics, predict otherwise
        assert not torch.equal(model(x).argmax(1), pred)
        assert not torch.equal(copy.deepcopy(model).train()(x).argmax(1), pred)
    fgsm = AttackConfig("fgsm", 0.2, 0.2, 1, False)
    model.eval()
    with br.quantized():  # a point counts under the attack only if it is also right clean
        fooled_or_wrong = (model(perturb(model, x, y, fgsm)).argmax(1) != y) | (pred != y)
        expected_fgsm = int((~fooled_or_wrong).sum()) / 11
    model.train()
    acc = accuracy(model, br, x, y, {"clean": None, "fgsm": fgsm}, batch_size=4)  # 4 + 4 + 3
    assert list(acc) == ["clean", "fgsm"]
    assert acc["clean"] == 6 / 11
    assert acc["fgsm"] == expected_fgsm
    assert acc["fgsm"] < acc["clean"]  # the attack ran
    assert model.training and br.state.mode == "relaxed"  # the caller's mode and phase are back
    # uint8 images are scaled by 1/255 batch by batch
    x8 = (x * 255).round().to(torch.uint8)
    y8 = _predict(model, br, x8.float() / 255)
    model.train()
    assert accuracy(model, br, x8, y8, {"clean": None}, batch_size=5) == {"clean": 1.0}
    model.eval()
    assert accuracy(model, br, x[:1], y[:1], {"clean": None}) == {"clean": 1.0}
    assert not model.training  # eval stays eval
    assert accuracy(model, br, x[:0], y[:0], {"clean": None}) == {"clean": 0.0}


def test_accuracy_scores_a_randomized_model_by_expected_correctness():
    """With noise injection a point scores the share of `draws` passes that get it right, and
    under an attack at most its clean score: checked per point against the same passes made by
    hand (same seed, same order: the clean passes, then each attack and its passes). A near-zero
    FGSM leaves points whose attacked passes happen to do better than their clean ones: the cap
    must hold there too."""
    from trainables.attacks import perturb
    from trainables.config import AttackConfig
    from trainables.metrics import accuracy

    torch.manual_seed(3)
    model = build_model(8, 4, 3, 10, ensemble=1, noise=0.3)
    br = quantize_(model, QuantConfig(bits=2))
    x, y = torch.rand(24, 3, 8, 8), torch.randint(0, 10, (24,))
    attacks = {"pgd": AttackConfig("pgd", 0.1, 0.03, 2, True), "clean": None,
               "tiny": AttackConfig("fgsm", 1e-4, 1e-4, 1, False)}
    model.eval()
    torch.manual_seed(11)
    scores = {}
    with br.quantized():
        for name in ("clean", "pgd", "tiny"):  # clean first, then the attacks in their order
            xa = x if attacks[name] is None else perturb(model, x, y, attacks[name])
            with torch.no_grad():
                scores[name] = torch.stack([model(xa).argmax(1) == y for _ in range(7)]).float().mean(0)
    clean = scores["clean"]
    assert not torch.all((clean == 0) | (clean == 1))  # the noise varies it
    assert (scores["tiny"] > clean).any()  # a point the cap applies to
    torch.manual_seed(11)
    acc = accuracy(model, br, x, y, attacks, batch_size=32, draws=7)
    assert acc["clean"] == pytest.approx(float(clean.mean()), abs=1e-6)
    for name in ("pgd", "tiny"):
        assert acc[name] == pytest.approx(float(torch.minimum(clean, scores[name]).mean()), abs=1e-6), name
        assert acc[name] <= acc["clean"]


def _bn_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, momentum=0.3))
    br = quantize_(model, QuantConfig(bits=2))
    br.start_epoch(0, 4)
    return model, br


def test_recalibrate_bn_is_the_average_over_batches_under_projected_weights():
    from trainables.metrics import recalibrate_bn_

    model, br = _bn_model()
    bn = model[1]
    batches = [torch.rand(6, 3, 5, 5) + i for i in range(3)]
    proj = br.quantized_weights()[0]
    outs = [torch.nn.functional.conv2d(xb, proj) for xb in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    bn.running_mean.fill_(5.0)  # stale statistics are reset, not averaged in
    model.eval()
    recalibrate_bn_(model, br, batches)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-4)
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.3 and not model.training and br.state.mode == "relaxed"
    model.train()
    recalibrate_bn_(model, br, batches[:1])
    assert model.training
    assert torch.allclose(bn.running_mean, outs[0].mean((0, 2, 3)), atol=1e-5)


def test_bn_recalibrated_restores_the_training_buffers():
    from trainables.metrics import bn_recalibrated

    model, br = _bn_model()
    bn = model[1]
    model.train()
    model(torch.rand(4, 3, 5, 5))  # training statistics, off their defaults
    saved = {k: v.clone() for k, v in bn.named_buffers()}
    batches = [torch.rand(6, 3, 5, 5) + 2.0]
    proj_mean = torch.nn.functional.conv2d(batches[0], br.quantized_weights()[0]).mean((0, 2, 3))
    with bn_recalibrated(model, br, batches):
        assert torch.allclose(bn.running_mean, proj_mean, atol=1e-5)
    for k, v in bn.named_buffers():
        assert torch.equal(v, saved[k]), k


def test_accuracy_runs_the_forwards_under_the_precision_asked_for():
    """precision = (device, "bf16") runs the evaluation forwards under autocast, as training does;
    without it they run in fp32."""
    from trainables.metrics import accuracy

    model, br = _tiny_quantized(seed=1)
    x = torch.rand(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    accuracy(model, br, x, y, {"clean": None}, precision=(torch.device("cpu"), "bf16"))
    accuracy(model, br, x, y, {"clean": None})
    assert seen == [torch.bfloat16, torch.float32]
