"""Binary-Relax (BR) quantization: projections onto low-bit sets and the relaxed training weights.

`quantize_(model, QuantConfig(bits=2))` mutates the model in the spirit of torchao: every selected
weight becomes a parametrization whose value is

* relaxed (phase I):    u = (w + lam * proj(w)) / (1 + lam), lam growing per optimizer step
                        from lambda0 to lambda_final at the start of phase II
* quantized (phase II): u = proj(w)

with a straight-through gradient to the float weight w, which is what the optimizer updates.
Evaluation, metrics and exported models always use proj(w) (see `BinaryRelax.quantized`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import QuantConfig
from .device import full_precision
from .models import PreActResNet

# ------------------------------------------------------------------------------------------
# projections: argmin_{z in Q} ||z - w||^2 with one scale per tensor


def project_binary(w: torch.Tensor) -> torch.Tensor:
    """delta * sign(w) with delta = mean|w| (exact; sign(0) = 0 keeps exact zeros)."""
    return w.abs().mean() * torch.sign(w)


def project_ternary_twn(w: torch.Tensor) -> torch.Tensor:
    """The reference rule: threshold 0.7*mean|w|; scale sum_S |w| / n (n, not |S|: the
    reference code's choice, kept so results compare with it)."""
    a = w.abs()
    mask = a >= 0.7 * a.mean()
    scale = (a * mask).sum() / w.numel()
    return scale * torch.sign(w) * mask


def project_ternary_exact(w: torch.Tensor) -> torch.Tensor:
    """Exact ternary projection (LBW-Net): keep the top-t entries maximising (sum a_i)^2 / t.
    The best t stays on the device (a mask by rank, no read of it): no host sync."""
    flat = w.reshape(-1)
    a, idx = flat.abs().sort(descending=True)
    csum = a.cumsum(0)
    t = torch.arange(1, a.numel() + 1, device=w.device, dtype=a.dtype)
    best = torch.argmax(csum * csum / t, dim=0, keepdim=True)  # 0-based, shape (1,)
    scale = csum.gather(0, best) / (best + 1).to(a.dtype)
    keep_sorted = torch.arange(a.numel(), device=w.device) <= best
    keep = torch.zeros_like(keep_sorted).scatter_(0, idx, keep_sorted)
    q = torch.where(keep, torch.sign(flat), torch.zeros_like(flat))
    return (scale * q).reshape(w.shape)


def _round_half_down(x: torch.Tensor) -> torch.Tensor:
    # the reference assigns |w| = (2j+1)h to level j, i.e. rounds halves down
    return torch.ceil(x - 0.5)


def project_multibit(w: torch.Tensor, bits: int, lloyd_iters: int = 1) -> torch.Tensor:
    """b bits, symmetric levels -K..K (K = 2^(b-1) - 1) times one scale.

    The first step assigns levels on the max-based grid (spacing 2*max|w|/(2K+1)) and refits the
    scale by least squares, as the reference 4-bit code does; every further Lloyd iteration
    re-assigns to the nearest level and refits, which never increases the error. An all-zero w
    (or all levels 0) projects to zeros, decided on the device: no host sync."""
    K = 2 ** (bits - 1) - 1
    a = w.abs()
    amax = a.max()
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    h = amax / (2 * K + 1)
    k = _round_half_down(torch.where(amax > 0, a / (2 * h), zero)).clamp_(0, K)
    s = zero
    for i in range(lloyd_iters):
        if i > 0:
            k = _round_half_down(torch.where(s > 0, a / s, zero)).clamp_(0, K)
        kk = (k * k).sum()
        s = torch.where(kk > 0, (a * k).sum() / kk.clamp_min(1), zero)
    return s * k * torch.sign(w)


def projector(config: QuantConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projection for a config's bit width (identity for 32-bit float)."""
    if config.bits == 32:
        return lambda w: w
    if config.bits == 1:
        return project_binary
    if config.bits == 2:
        return project_ternary_exact if config.ternary_mode == "exact" else project_ternary_twn
    bits, iters = config.bits, config.lloyd_iters
    return lambda w: project_multibit(w, bits, iters)


# ------------------------------------------------------------------------------------------
# relaxed weights with a straight-through gradient


class _StraightThrough(torch.autograd.Function):
    """Forward returns the target weights exactly; backward hands the gradient to w unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return target

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


@dataclass
class _State:
    lam: float
    mode: str = "relaxed"  # relaxed | quantized


def exclude_from_compile() -> None:
    """Keep the BR target eager under torch.compile. Done when --compile is used, not at import:
    `torch.compiler.disable` at class definition imports dynamo in every process that imports
    this module (every Ray trial), and wraps every eager call."""
    if not getattr(_BRWeight.target, "_brs_eager", False):
        _BRWeight.target = torch.compiler.disable(_BRWeight.target)
        _BRWeight.target._brs_eager = True


class _BRWeight(nn.Module):
    """u = target(w) (relaxed or projected), with a straight-through gradient to w.

    The target is a detached function of w, so it may be computed under no_grad and reused;
    the autograd node is built on every forward that needs one. That is the invariant that keeps
    gradients flowing: a forward under no_grad (e.g. the natural forward of the TRADES attack)
    never hands a gradient-less weight to a later forward that trains. Inside a `cached()` block
    the target is reused while the phase and lambda stay the same; entering or leaving any block
    drops it, so the float weights must not change inside one (as with parametrize.cached)."""

    def __init__(self, state: _State, project: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.state = state
        self.project = project
        self._key: tuple | None = None
        self._target: torch.Tensor | None = None

    def _compute_target(self, w: torch.Tensor) -> torch.Tensor:
        # fp32 even inside an autocast region: the projection's sums and scale fits need it
        with torch.no_grad(), full_precision(w.device.type):
            p = self.project(w.detach())
            if self.state.mode == "relaxed":
                lam = self.state.lam
                p = (w.detach() + lam * p) / (1.0 + lam)
        return p

    def target(self, w: torch.Tensor) -> torch.Tensor:
        """Left out of torch.compile (--compile; see `exclude_from_compile`): the key reads Python
        state that changes every step (lam, the cache generation, the weight's address) and each
        layer has its own shape, so a traced target recompiled each step until dynamo's recompile
        limit (measured on CPU, docs/benchmarks.md); it runs once per layer per cached block."""
        if _GLOBAL_CACHE[0] <= 0:
            self._key = self._target = None
            return self._compute_target(w)
        key = (_GLOBAL_CACHE[1], w.data_ptr(), w.device, w.dtype, self.state.mode, self.state.lam)
        if self._target is None or self._key != key:
            self._target = self._compute_target(w)
            self._key = key
        return self._target

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        p = self.target(w)
        if w.requires_grad and torch.is_grad_enabled():
            return _StraightThrough.apply(w, p)
        return p


@dataclass
class BinaryRelax:
    """Handle returned by `quantize_`: the selected layers, the schedule and the weight views."""

    config: QuantConfig
    modules: list[tuple[str, nn.Module]]
    state: _State = field(default_factory=lambda: _State(lam=1.0))
    _where: tuple[int, int, int] = (0, 1, 1)  # (epoch, epochs, steps per epoch) of start_epoch

    @property
    def enabled(self) -> bool:
        return self.config.bits != 32

    @property
    def lam(self) -> float:
        return self.state.lam

    def phase2_epoch(self, epochs: int) -> int:
        """First hard-quantized epoch. Any phase2_start < 1 leaves at least the last epoch in
        phase II, so BatchNorm statistics match the deployed weights; 1.0 means never."""
        if self.config.phase2_start >= 1.0:
            return epochs
        return min(int(round(self.config.phase2_start * epochs)), epochs - 1)

    def lam_at(self, epoch: int, step: int, epochs: int, steps_per_epoch: int) -> float:
        """lambda for optimizer step `step` (0-based) of epoch `epoch` (0-based).

        "final": lambda0 * (lambda_final/lambda0)^(s/S) with s the 1-based step count and S the
        number of phase-I steps, so the first step already grows (as the reference's epoch 0
        uses lambda0*rho) and the last phase-I step uses lambda_final; phase II keeps
        lambda_final. "rho": lambda0 * rho^(epoch+1), constant within an epoch (the reference)."""
        c = self.config
        if c.lambda_schedule == "rho":
            return c.lambda0 * c.rho ** (epoch + 1)
        total = self.phase2_epoch(epochs) * max(1, steps_per_epoch)
        done = epoch * max(1, steps_per_epoch) + step + 1
        if total <= 0 or done >= total:
            return float(c.lambda_final)
        return c.lambda0 * (c.lambda_final / c.lambda0) ** (done / total)

    def start_epoch(self, epoch: int, epochs: int, steps_per_epoch: int = 1) -> None:
        """Enter epoch `epoch`: the phase (hard quantization from epoch
        round(phase2_start * epochs) on) and lambda of its first step."""
        self._where = (epoch, epochs, steps_per_epoch)
        self.state.lam = self.lam_at(epoch, 0, epochs, steps_per_epoch)
        self.state.mode = "quantized" if epoch >= self.phase2_epoch(epochs) else "relaxed"

    def start_step(self, step: int) -> None:
        """lambda of optimizer step `step` (0-based) of the epoch entered last."""
        epoch, epochs, spe = self._where
        self.state.lam = self.lam_at(epoch, step, epochs, spe)

    def float_weights(self) -> list[torch.Tensor]:
        """The float shadow weights w (what the optimizer and the group penalty see)."""
        return [_float_weight(m) for _, m in self.modules]

    def quantized_weights(self) -> list[torch.Tensor]:
        """proj(w) of every selected layer, detached: the deployed weights."""
        project = projector(self.config)
        with torch.no_grad():
            return [project(w.detach()) for w in self.float_weights()]

    @contextlib.contextmanager
    def quantized(self) -> Iterator[None]:
        """Forward passes inside use the fully quantized weights (evaluation, export)."""
        mode = self.state.mode
        self.state.mode = "quantized"
        try:
            with self.cached():
                yield
        finally:
            self.state.mode = mode

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Compute each layer's relaxed/projected weights once while w is unchanged (the attack
        runs several forwards per step); gradients still flow to w on every forward. The same
        block as the module-level `cached()`: one mechanism, one set of rules."""
        with cached():
            yield

    def state_dict(self) -> dict:
        return {"lam": self.state.lam, "mode": self.state.mode}

    def load_state_dict(self, d: dict) -> None:
        self.state.lam = float(d["lam"])
        self.state.mode = str(d["mode"])


def _float_weight(m: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return m.weight


# [depth of nested module-level `cached()` blocks, generation: bumped on entering or leaving any
# cached block, so a target never outlives the block it was computed in]
_GLOBAL_CACHE = [0, 0]


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Reuse each layer's projected target within the block (see `BinaryRelax.cached`), for
    every quantized model.

    Deliberately not `torch.nn.utils.parametrize.cached()`: that caches the first *output*,
    autograd node included, so a first forward under no_grad would hand a detached weight to
    every later forward and the quantized layers would get no gradient."""
    _GLOBAL_CACHE[0] += 1
    _GLOBAL_CACHE[1] += 1
    try:
        yield
    finally:
        _GLOBAL_CACHE[0] -= 1
        _GLOBAL_CACHE[1] += 1


def select_layers(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """Stem and 3x3 convolutions by default; 1x1 shortcuts and the classifier by flag."""
    stems = {id(m.conv1) for m in model.modules() if isinstance(m, PreActResNet)}
    chosen = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if id(m) in stems:
                ok = config.quantize_stem
            elif m.kernel_size == (1, 1):
                ok = config.quantize_shortcut
            else:
                ok = True
        elif isinstance(m, nn.Linear):
            ok = config.quantize_fc
        else:
            ok = False
        if ok:
            chosen.append((name, m))
    return chosen


def quantize_(model: nn.Module, config: QuantConfig) -> BinaryRelax:
    """Make `model` train with Binary-Relax weights per `config`; returns the schedule handle.

    At 32 bits nothing is registered (no overhead); the handle still names the layers so the
    group penalty and the sparsity metrics cover the same set at every bit width."""
    config.validate()
    br = BinaryRelax(config, select_layers(model, config), _State(lam=config.lambda0))
    if br.enabled:
        project = projector(config)
        for _, m in br.modules:
            parametrize.register_parametrization(m, "weight", _BRWeight(br.state, project))
    model.binary_relax = br  # type: ignore[assignment]
    return br


def export_state_dict(model: nn.Module, br: BinaryRelax) -> dict[str, torch.Tensor]:
    """A plain state dict (no parametrization keys) holding the fully quantized weights."""
    q = {id(m): w for (_, m), w in zip(br.modules, br.quantized_weights())}
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if "parametrizations" in name:
                continue
            out[f"{name}.{pname}" if name else pname] = p.detach().cpu().clone()
        if parametrize.is_parametrized(m, "weight") or id(m) in q:
            out[f"{name}.weight" if name else "weight"] = q[id(m)].cpu().clone()
    return out


def layer_bits(q: torch.Tensor, bits: int) -> int:
    """Bits a deployed file stores for one quantized tensor q = proj(w): b per entry plus one
    32-bit scale. A 1-bit code holds only the signs {-d, +d}, so a binary layer with zeros
    (groups the proximal step zeroed, or exact-zero floats) also stores where they are: one bit
    per output filter when every zero lies in an all-zero filter, else one per input channel when
    every zero lies in an all-zero input channel, else one per entry (then it costs what a
    ternary code would). Zero codes of b >= 2 layers are ordinary levels and cost nothing extra."""
    size = bits * q.numel() + 32
    if bits != 1 or q.dim() < 2 or bool(q.ne(0).all()):
        return size
    zero = q.eq(0)
    for axis in (0, 1):
        dead = zero.transpose(0, axis).reshape(q.shape[axis], -1).all(dim=1)
        if bool((zero.transpose(0, axis).reshape(q.shape[axis], -1) == dead[:, None]).all()):
            return size + q.shape[axis]
    return size + q.numel()


def model_bits(model: nn.Module, br: BinaryRelax) -> tuple[int, int]:
    """(size in bits, parameter count): `layer_bits` for every quantized layer (b*numel + one
    32-bit scale, plus the zero mask of a binary layer that has zeros), 32 bits for every float
    parameter (BN running stats are buffers and not counted)."""
    q = {id(_float_weight(m)): w for (_, m), w in zip(br.modules, br.quantized_weights())} \
        if br.enabled else {}
    total_bits = 0
    n = 0
    for p in model.parameters():
        n += p.numel()
        if id(p) in q:
            total_bits += layer_bits(q[id(p)], br.config.bits)
        else:
            total_bits += 32 * p.numel()
    return total_bits, n


def distinct_values(w: torch.Tensor) -> int:
    return int(torch.unique(w).numel())
