"""Golden cases: small hand-worked tensors whose expected levels and scale are written out from
the formulas of ../shared/docs/algorithms.md (section 1.2 for the projections, 3.3 for the group
proximal step, 5 for the metrics). Each case states its arithmetic in the comments, so a reader
checks the expected values against the formulas, not against the code.

Multi-bit (b bits): K = 2^(b-1) - 1, h = max|w| / (2K + 1), first levels k = round(|w| / (2h))
with halves rounded down (the reference gives |w| = (2j+1) h level j), clipped to [0, K]; scale
s = <|w|, k> / <k, k>; every further Lloyd step k <- round(|w| / s) (halves down), clipped, and
s refitted. The cases use max|w| = 2K + 1, so h = 1 and the first grid is |w| / 2, and they put
entries on halves and in the band a grid spaced 2 max / (2K) (instead of 2 max / (2K + 1)) would
assign to another level.
"""

import pytest
import torch
from torch import nn

from trainables.config import QuantConfig
from trainables.losses import group_prox_
from trainables.metrics import channel_sparsity, structure_metrics
from trainables.quant import (
    layer_bits,
    project_binary,
    project_multibit,
    project_ternary_exact,
    project_ternary_twn,
    projector,
    quantize_,
)


def _expect(p: torch.Tensor, scale: float, levels: list[int]) -> None:
    """p == scale * levels (signed integer levels), to float32 rounding of the scale."""
    want = torch.tensor(levels, dtype=torch.float64) * scale
    torch.testing.assert_close(p.to(torch.float64), want.reshape(p.shape), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# binary and ternary


def test_binary_golden():
    # delta = mean|w| = (0.5 + 1 + 0 + 2.5) / 4 = 1; sign(0) = 0 keeps the zero
    w = torch.tensor([[0.5, -1.0], [0.0, 2.5]])
    _expect(project_binary(w), 1.0, [[1, -1], [0, 1]])
    assert projector(QuantConfig(bits=1))(w).equal(project_binary(w))


def test_ternary_twn_golden():
    # mean|w| = (0.3 + 1.2 + 0.7 + 0 + 0.1 + 2.0 + 0.5 + 0.6) / 8 = 0.675, threshold 0.7 * 0.675 = 0.4725;
    # support {1.2, 0.7, 2.0, 0.5, 0.6}; scale = (1.2 + 0.7 + 2.0 + 0.5 + 0.6) / n = 5.0 / 8 (n, not |S|)
    w = torch.tensor([0.3, -1.2, 0.7, 0.0, -0.1, 2.0, 0.5, -0.6])
    _expect(project_ternary_twn(w), 5.0 / 8, [0, -1, 1, 0, 0, 1, 1, -1])
    # an entry on the threshold is kept (|w| >= 0.7 mean|w|): mean = 40 / 4 = 10, threshold 7.0;
    # support {7, 13, 20}, scale = 40 / 4 = 10
    w = torch.tensor([7.0, -13.0, 20.0, 0.0])
    _expect(project_ternary_twn(w), 10.0, [1, -1, 1, 0])
    assert projector(QuantConfig(bits=2)).__name__ == "project_ternary_twn"  # the reference rule by default


def test_ternary_exact_golden():
    # |w| sorted: 3, 2, 1, 0.5; partial sums 3, 5, 6, 6.5; (sum)^2 / t = 9, 12.5, 12, 10.5625 -> t* = 2,
    # delta = 5 / 2
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    _expect(project_ternary_exact(w), 2.5, [1, 0, 1, 0])
    # sorted 2, 2, 1, 0; sums 2, 4, 5, 5; (sum)^2 / t = 4, 8, 25/3, 6.25 -> t* = 3, delta = 5 / 3
    w = torch.tensor([[-2.0, 2.0], [1.0, 0.0]])
    _expect(project_ternary_exact(w), 5.0 / 3, [[-1, 1], [1, 0]])
    _expect(projector(QuantConfig(bits=2, ternary_mode="exact"))(w), 5.0 / 3, [[-1, 1], [1, 0]])


# ------------------------------------------------------------------------------------------
# multi-bit: (bits, w, [(scale, signed levels) after 1, 2, 3 steps])

MULTIBIT = {
    # K = 1, max 3, h = 1. |w| / 2 = 1.5, 0.75, 0.5, 0.25, 1.125, 0 -> k = 1, 1, 0 (half down), 0, 1, 0;
    # s = (3 + 1.5 + 2.25) / 3 = 2.25. Step 2: |w| / 2.25 = 1.33, 0.67, 0.44, 0.22, 1, 0: the same levels.
    2: ([3.0, -1.5, 1.0, 0.5, -2.25, 0.0],
        [(6.75 / 3, [1, -1, 0, 0, -1, 0])] * 3),
    # K = 3, max 7, h = 1. |w| / 2 = 3.5, 2.75, 2.5, 2.375, 2.625, 3.375, 0.5, 0
    #   -> k = 3 (3.5: half down to 3), 3, 2 (half down), 2, 3, 3, 0 (half down), 0;
    #   s1 = (21 + 16.5 + 10 + 9.5 + 15.75 + 20.25) / (9 + 9 + 4 + 4 + 9 + 9) = 93 / 44 = 2.1136.
    # Step 2: |w| / s1 = 3.31, 2.60, 2.37, 2.25, 2.48, 3.19, 0.47 -> 3, 3, 2, 2, 2, 3, 0;
    #   s2 = (21 + 16.5 + 10 + 9.5 + 10.5 + 20.25) / (9 + 9 + 4 + 4 + 4 + 9) = 87.75 / 39 = 2.25.
    # Step 3: |w| / 2.25 = 3.11, 2.44, 2.22, 2.11, 2.33, 3.0, 0.44 -> 3, 2, 2, 2, 2, 3, 0;
    #   s3 = (21 + 11 + 10 + 9.5 + 10.5 + 20.25) / (9 + 4 + 4 + 4 + 4 + 9) = 82.25 / 34.
    3: ([7.0, -5.5, 5.0, -4.75, 5.25, -6.75, -1.0, 0.0],
        [(93 / 44, [3, -3, 2, -2, 3, -3, 0, 0]),
         (87.75 / 39, [3, -3, 2, -2, 2, -3, 0, 0]),
         (82.25 / 34, [3, -2, 2, -2, 2, -3, 0, 0])]),
    # K = 7, max 15, h = 1. |w| / 2 = 7.5, 6.625, 6.5, 2.625, 4.125, 1.5 -> 7 (half down), 7, 6 (half down),
    #   3, 4, 1 (half down); s1 = (105 + 92.75 + 78 + 15.75 + 33 + 3) / (49 + 49 + 36 + 9 + 16 + 1) = 327.5 / 160.
    # Step 2: |w| / s1 = 7.33, 6.47, 6.35, 2.56, 4.03, 1.47 -> 7, 6, 6, 3, 4, 1;
    #   s2 = (105 + 79.5 + 78 + 15.75 + 33 + 3) / (49 + 36 + 36 + 9 + 16 + 1) = 314.25 / 147.
    # Step 3: |w| / s2 = 7.02, 6.20, 6.08, 2.46, 3.86, 1.40 -> 7, 6, 6, 2, 4, 1;
    #   s3 = (105 + 79.5 + 78 + 10.5 + 33 + 3) / (49 + 36 + 36 + 4 + 16 + 1) = 309 / 142.
    4: ([-15.0, 13.25, 13.0, -5.25, 8.25, 3.0],
        [(327.5 / 160, [-7, 7, 6, -3, 4, 1]),
         (314.25 / 147, [-7, 6, 6, -3, 4, 1]),
         (309 / 142, [-7, 6, 6, -2, 4, 1])]),
    # K = 127, max 255, h = 1. |w| / 2 = 127.5, 127, 63.5, 0.5, 1.5, 50.375, 0.125, 63.625 -> 127 (half down),
    #   127, 63 (half down), 0 (half down), 1 (half down), 50, 0, 64;
    #   s1 = (255*127 + 254*127 + 127*63 + 3 + 100.75*50 + 127.25*64) / (127^2 + 127^2 + 63^2 + 1 + 50^2 + 64^2)
    #      = 85828.5 / 42824.
    # Step 2: |w| / s1 = 127.2, 126.7, 63.4, 0.499, 1.497, 50.3, 0.12, 63.49 -> the last entry drops to 63;
    #   s2 = (85828.5 - 127.25) / (42824 - 64^2 + 63^2) = 85701.25 / 42697.
    # Step 3: |w| / s2 = 127.0, 126.5, 63.3, 0.498, 1.495, 50.2, 0.12, 63.4: the same levels (a fixed point).
    8: ([255.0, -254.0, 127.0, -1.0, 3.0, 100.75, 0.25, -127.25],
        [(85828.5 / 42824, [127, -127, 63, 0, 1, 50, 0, -64]),
         (85701.25 / 42697, [127, -127, 63, 0, 1, 50, 0, -63]),
         (85701.25 / 42697, [127, -127, 63, 0, 1, 50, 0, -63])]),
}


@pytest.mark.parametrize("bits", sorted(MULTIBIT))
@pytest.mark.parametrize("lloyd_iters", [1, 2, 3])
def test_multibit_golden(bits, lloyd_iters):
    w, steps = MULTIBIT[bits]
    scale, levels = steps[lloyd_iters - 1]
    _expect(project_multibit(torch.tensor(w), bits, lloyd_iters), scale, levels)
    if bits > 2:  # 2 bits is ternary in a config; 3+ bits go through project_multibit with the config's steps
        p = projector(QuantConfig(bits=bits, lloyd_iters=lloyd_iters))(torch.tensor(w))
        _expect(p, scale, levels)


def test_multibit_golden_in_float64_and_as_a_4d_layer():
    """The same case in float64 and shaped as a conv weight: the projection is per tensor."""
    w, steps = MULTIBIT[4]
    scale, levels = steps[0]
    _expect(project_multibit(torch.tensor(w, dtype=torch.float64), 4), scale, levels)
    _expect(project_multibit(torch.tensor(w).reshape(3, 2, 1, 1), 4), scale, levels)


# ------------------------------------------------------------------------------------------
# group proximal step, channel sparsity, size


def test_group_prox_golden():
    # filters (axis "out") of a (3, 2, 1, 1) weight: [3, 4] (norm 5), [0.6, 0.8] (norm 1), [0, 1.5] (norm 1.5);
    # step 1.5: 5 -> factor 1 - 1.5 / 5 = 0.7 -> [2.1, 2.8]; norm 1 < 1.5 -> 0; norm 1.5 = step -> 0
    w = torch.tensor([[3.0, 4.0], [0.6, -0.8], [0.0, 1.5]], dtype=torch.float64).reshape(3, 2, 1, 1)
    group_prox_([w], 1.5, "out")
    torch.testing.assert_close(w.reshape(3, 2), torch.tensor([[2.1, 2.8], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    # input channels (axis "in") of a (2, 2, 1, 1) weight: channel 0 = [3, 4] (norm 5), channel 1 = [1, 0];
    # step 2.5: factor 0.5 -> [1.5, 2]; norm 1 -> 0. A 2-D weight is left alone; an all-zero group stays 0.
    w = torch.tensor([[3.0, 1.0], [4.0, 0.0]], dtype=torch.float64).reshape(2, 2, 1, 1)
    fc = torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    dead = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    group_prox_([w, fc, dead], 2.5, "in")
    torch.testing.assert_close(w.reshape(2, 2), torch.tensor([[1.5, 0.0], [2.0, 0.0]], dtype=torch.float64))
    assert fc.tolist() == [[0.1, 0.2]] and dead.eq(0).all()


def test_channel_sparsity_golden():
    # layer a (3 filters, 2 inputs): filter 1 is zero; layer b (2 filters, 3 inputs): input 0 and filter 0
    # are zero; the 1-D bias has no channels. out: (1 + 1) / (3 + 2) = 0.4; in: (0 + 1) / (2 + 3) = 0.2
    a = torch.tensor([[[1.0], [2.0]], [[0.0], [0.0]], [[0.0], [3.0]]])
    b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert channel_sparsity([a, b, torch.zeros(4)], "out") == 2 / 5
    assert channel_sparsity([a, b, torch.zeros(4)], "in") == 1 / 5


def test_size_bits_golden():
    """size_bits: b bits per entry of each quantized layer plus a 32-bit scale, 32 bits for every
    float parameter. The model: a 3x3 conv 2 -> 3 (54 weights, quantized), a 1x1 conv 3 -> 4
    (12 weights, float: shortcuts stay float by default), a linear 4 -> 2 (8 + 2, float)."""
    floats = 32 * (12 + 8 + 2)
    for bits, quantized in [(32, 32 * 54), (1, 54 + 32), (2, 2 * 54 + 32), (3, 3 * 54 + 32), (4, 4 * 54 + 32), (8, 8 * 54 + 32)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Conv2d(3, 4, 1, bias=False), nn.Flatten(), nn.Linear(4, 2))
        br = quantize_(model, QuantConfig(bits=bits))
        assert structure_metrics(model, br)["size_bits"] == quantized + floats, bits
        assert structure_metrics(model, br)["compression"] == 32 * (54 + 22) / (quantized + floats)
    # a binary layer whose zeros fill one output filter stores one mask bit per filter: 54 + 32 + 3
    q = torch.ones(3, 2, 3, 3)
    q[1] = 0
    assert layer_bits(q, 1) == 54 + 32 + 3
    assert layer_bits(q, 2) == 2 * 54 + 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_golden_cases_on_cuda():
    """The same cases with the tensors on the GPU: every tensor a projection makes must be made
    on the weights' device (an index or count made on the host meets device tensors there)."""
    from trainables.metrics import accuracy

    cuda = torch.device("cuda")
    w = torch.tensor([3.0, -1.0, 2.0, 0.5], device=cuda)
    p = project_ternary_exact(w)
    assert p.device.type == "cuda"
    _expect(p.cpu(), 2.5, [1, 0, 1, 0])
    for bits, (w, steps) in MULTIBIT.items():
        for iters, (scale, levels) in enumerate(steps, start=1):
            p = project_multibit(torch.tensor(w, device=cuda), bits, iters)
            assert p.device.type == "cuda"
            _expect(p.cpu(), scale, levels)
    # accuracy keeps its counts on the device: one read at the end, no sync per batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).to(cuda)
    br = quantize_(model, QuantConfig(bits=32))
    x, y = torch.rand(10, 1, 2, 2, device=cuda), torch.randint(0, 3, (10,), device=cuda)
    want = float((model(x).argmax(1) == y).float().mean())
    assert accuracy(model, br, x, y, {"clean": None}, batch_size=3)["clean"] == pytest.approx(want)
