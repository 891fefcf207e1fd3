"""A trained model as a packed low-bit file, and back to an `nn.Module`.

`model.pt` is a float `torch.save` of the projected weights: 32 bits per weight even where the
model has 1, 2 or 4. `write_packed` stores every quantized layer as its integer codes, packed
b bits per code (8, 4 or 2 codes per byte at 1, 2, 4 bits), and one float32 scale; BatchNorm,
unquantized shortcuts and the classifier stay float32. The file is a small JSON header and one
binary section (format spec: docs/export.md). `load_packed` rebuilds the `Ensemble` with plain
float weights scale * code, bit-identical to the projected weights it was written from.

Pure PyTorch and numpy: nothing here needs Ray, Optuna or MLflow.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ConfigError, QuantConfig, TrainConfig
from .contract import training_config
from .fileio import atomic_path
from .models import Ensemble, build_model, noise
from .quant import model_bits, quantize_, select_layers

FORMAT = "brsearch-packed"
VERSION = 1
MAGIC = b"BRPK"
SCALE_BYTES = 4
# image side per built-in dataset (for the checks' inputs and ONNX's example input); folders: None
IMAGE_SIZES = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "svhn": 32}


class ExportError(ValueError):
    """A model or file that cannot be packed or read; the message is one line."""


@dataclass
class Packed:
    """A loaded packed file: the rebuilt model (eval mode) and its header."""

    model: Ensemble
    header: dict[str, Any]


# ------------------------------------------------------------------------------------------
# integer codes of projected weights


def levels(bits: int) -> int:
    """K: codes run -K..K (ternary at 2 bits, {-1, +1} plus exact zeros at 1 bit)."""
    return 1 if bits <= 2 else 2 ** (bits - 1) - 1


def _decode(codes: torch.Tensor, scale: float) -> torch.Tensor:
    return codes.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


def _float32_neighbours(x: float, n: int = 4) -> list[float]:
    """x rounded to float32 and its n float32 neighbours on each side, nearest first."""
    c = np.float32(x)
    out, up, down = [float(c)], c, c
    for _ in range(n):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        out += [float(up), float(down)]
    return out


def codes_and_scale(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """Integer codes c in -K..K and a float32 scale s with s * c == q exactly, for q a projected
    weight (quant.projector: one scale times integer levels). The scale is recovered from q alone:
    the smallest nonzero magnitude is s * k1 for some level k1; the first k1 that makes every
    magnitude an integer multiple (<= K) whose float32 product reproduces q bit for bit wins.
    Raises ExportError when q is not of that form (e.g. float weights passed as quantized)."""
    q = q.detach().to("cpu", torch.float32)
    K = levels(bits)
    mags = torch.unique(q.abs().reshape(-1))
    mags = mags[mags > 0].double()
    if mags.numel() == 0:
        return torch.zeros(q.shape, dtype=torch.int8), 0.0
    if mags.numel() > 2 * K + 1:
        raise ExportError(f"weights are not one float32 scale times {bits}-bit integer levels "
                          f"({mags.numel()} distinct magnitudes; at most {K})")
    sign = torch.sign(q)
    for k1 in range(1, K + 1):
        ratio = mags / (mags[0] / k1)
        k = ratio.round()
        if (ratio - k).abs().max() > 1e-3 or k.max() > K:
            continue
        # every magnitude -> its level, then the signed code of every entry
        level = torch.bucketize(q.abs().double().reshape(-1), mags).clamp_(max=mags.numel() - 1)
        mag_code = torch.where(q.reshape(-1) == 0, torch.zeros(()), k[level].float())
        codes = (sign.reshape(-1) * mag_code).to(torch.int16).reshape(q.shape)
        for s in _float32_neighbours(float(mags[0] / k1)):
            if torch.equal(_decode(codes, s), q):
                return codes.to(torch.int8), s
    raise ExportError(f"weights are not one float32 scale times {bits}-bit integer levels")


# ------------------------------------------------------------------------------------------
# bit packing: code i occupies bits [i*b, (i+1)*b) of the stream, least significant bit first


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned values < 2**bits, `bits` bits each, LSB-first (8, 4, 2 per byte at 1, 2, 4 bits)."""
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1, 1)
    stream = np.unpackbits(v, axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, n: int, bits: int) -> np.ndarray:
    stream = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    wide = np.zeros((n, 8), np.uint8)
    wide[:, :bits] = stream
    return np.packbits(wide, axis=1, bitorder="little").reshape(-1)


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _encode_quant(codes: torch.Tensor, scale: float, bits: int) -> bytes:
    """scale (float32) | packed codes; at 1 bit codes are the signs, and exact zeros (whole
    filters after group sparsity, rarely single weights) follow as a filter bitmask plus a list."""
    c = codes.reshape(-1).numpy().astype(np.int16)
    out = struct.pack("<f", scale)
    if bits == 1:
        out += pack_bits((c > 0).astype(np.uint8), 1)
        filters = codes.reshape(codes.shape[0], -1).numpy()
        dead = ~filters.any(axis=1)
        out += pack_bits(dead.astype(np.uint8), 1)
        per = filters.shape[1]
        zeros = np.flatnonzero((c == 0) & ~np.repeat(dead, per))
        out += struct.pack("<I", len(zeros)) + zeros.astype("<u4").tobytes()
        return out
    return out + pack_bits((c + levels(bits)).astype(np.uint8), bits)


def _decode_quant(buf: memoryview, pos: int, shape: tuple[int, ...], bits: int) -> tuple[torch.Tensor, int]:
    n = int(np.prod(shape))
    (scale,) = struct.unpack_from("<f", buf, pos)
    pos += SCALE_BYTES
    nb = packed_nbytes(n, bits)
    u = unpack_bits(bytes(buf[pos : pos + nb]), n, bits).astype(np.int16)
    pos += nb
    if bits == 1:
        c = np.where(u > 0, 1, -1).astype(np.int16)
        nf = shape[0]
        fb = packed_nbytes(nf, 1)
        dead = unpack_bits(bytes(buf[pos : pos + fb]), nf, 1).astype(bool)
        pos += fb
        c.reshape(nf, -1)[dead] = 0
        (nz,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        c[np.frombuffer(buf, "<u4", nz, pos).astype(np.int64)] = 0
        pos += 4 * nz
    else:
        c = u - levels(bits)
    return _decode(torch.from_numpy(c).reshape(shape), scale), pos


# ------------------------------------------------------------------------------------------
# the file


def architecture(state_dict: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, Any]:
    """depth/width/ensemble/noise from the config; in_channels/num_classes from the weights."""
    members = {k.split(".")[1] for k in state_dict if k.startswith("members.")}
    try:
        arch = {"depth": cfg.depth, "width": cfg.width,
                "in_channels": int(state_dict["members.0.conv1.weight"].shape[1]),
                "num_classes": int(state_dict["members.0.fc.weight"].shape[0]),
                "ensemble": cfg.ensemble, "noise": float(cfg.noise)}
    except KeyError as e:
        raise ExportError(f"not an EnResNet state dict (no {e.args[0]})") from None
    if len(members) != cfg.ensemble:
        raise ExportError(f"the weights have {len(members)} members, the config says ensemble={cfg.ensemble}")
    return arch


def _quant_config(header_quant: dict[str, Any]) -> QuantConfig:
    keys = ("bits", "ternary_mode", "quantize_stem", "quantize_shortcut", "quantize_fc")
    return QuantConfig(**{k: header_quant[k] for k in keys})


def _layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The stored tensors in order: the model's state dict minus BN's num_batches_tracked."""
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]


def _layout_hash(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def _quantized_names(model: Ensemble, qc: QuantConfig) -> list[str]:
    return [f"{n}.weight" for n, _ in select_layers(model, qc)] if qc.bits != 32 else []


def size_bits(arch: dict[str, Any], qc: QuantConfig,
              state_dict: dict[str, torch.Tensor] | None = None) -> int:
    """The model's size as trainables.metrics counts it (quant.model_bits). With the weights
    given, their zeros count too (a binary layer with zeros stores a mask: quant.layer_bits)."""
    model = build_model(**arch)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model_bits(model, quantize_(model, qc))[0]


def packed_file(state_dict: dict[str, torch.Tensor], cfg: TrainConfig, *, image_size: int | None = None,
                meta: dict[str, Any] | None = None) -> tuple[dict[str, Any], bytes]:
    """(header, file bytes) of `state_dict` (model.pt: the quantized state dict of a model trained
    with `cfg`) packed; every quantized layer must decode exactly. A trial's `size_kib` is the
    length of this file with no `meta` (trainables.footprint)."""
    arch = architecture(state_dict, cfg)
    q = cfg.quant
    qh = {"bits": q.bits, "ternary_mode": q.ternary_mode, "quantize_stem": q.quantize_stem,
          "quantize_shortcut": q.quantize_shortcut, "quantize_fc": q.quantize_fc}
    model = build_model(**arch)
    layout = _layout(model)
    quantized = set(_quantized_names(model, q))
    blob = bytearray()
    for name, shape in layout:
        if name not in state_dict:
            raise ExportError(f"the weights lack {name}")
        t = state_dict[name].detach().to("cpu")
        if tuple(t.shape) != shape:
            raise ExportError(f"{name} has shape {tuple(t.shape)}, the architecture needs {shape}")
        if name in quantized:
            try:
                codes, scale = codes_and_scale(t, q.bits)
            except ExportError as e:
                raise ExportError(f"{name}: {e}") from None
            blob += _encode_quant(codes, scale, q.bits)
        else:
            blob += t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
    header = {
        "format": FORMAT, "version": VERSION, "arch": arch, "quant": qh,
        "quantized": sorted({n.split(".", 2)[2] for n in quantized}),  # per member
        "image_size": image_size if image_size is not None else IMAGE_SIZES.get(cfg.dataset),
        "layout": _layout_hash(layout), "size_bits": size_bits(arch, q, state_dict),
        "data_bytes": len(blob), "data_sha256": hashlib.sha256(blob).hexdigest(),
        "meta": meta or {},
    }
    raw = json.dumps(header, separators=(",", ":"), default=str).encode()
    return header, MAGIC + struct.pack("<I", len(raw)) + raw + bytes(blob)


def write_packed(state_dict: dict[str, torch.Tensor], cfg: TrainConfig, path: str | Path, *,
                 image_size: int | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pack `state_dict` into `path` (`packed_file`), atomically; returns the header."""
    header, data = packed_file(state_dict, cfg, image_size=image_size, meta=meta)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return header


def read_header(path: str | Path) -> dict[str, Any]:
    return _read(path)[0]


def _read(path: str | Path) -> tuple[dict[str, Any], memoryview]:
    data = Path(path).read_bytes()
    if data[:4] != MAGIC or len(data) < 8:
        raise ExportError(f"{path} is not a {FORMAT} file")
    (n,) = struct.unpack_from("<I", data, 4)
    header = json.loads(data[8 : 8 + n])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ExportError(f"{path}: format {header.get('format')} v{header.get('version')}; this reader: {FORMAT} v{VERSION}")
    blob = memoryview(data)[8 + n :]
    if len(blob) != header["data_bytes"] or hashlib.sha256(blob).hexdigest() != header["data_sha256"]:
        raise ExportError(f"{path} is truncated or corrupt (data checksum mismatch)")
    return header, blob


def load_packed(path: str | Path) -> Packed:
    """Rebuild the model a packed file holds (eval mode; weights = scale * code as float32)."""
    header, blob = _read(path)
    model = build_model(**header["arch"])
    qc = _quant_config(header["quant"])
    layout = _layout(model)
    if _layout_hash(layout) != header["layout"]:
        raise ExportError(f"{path}: written for another version of trainables.models (layout differs)")
    quantized = set(_quantized_names(model, qc))
    if sorted({n.split(".", 2)[2] for n in quantized}) != header["quantized"]:
        raise ExportError(f"{path}: quantized layers differ from what the header's flags select")
    state: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in layout:
        if name in quantized:
            state[name], pos = _decode_quant(blob, pos, shape, qc.bits)
        else:
            n = int(np.prod(shape))
            state[name] = torch.from_numpy(np.frombuffer(blob, "<f4", n, pos).copy()).reshape(shape)
            pos += 4 * n
    if pos != len(blob):
        raise ExportError(f"{path}: {len(blob) - pos} bytes left over after the last tensor")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return Packed(model.eval(), header)


def size_bound(size_bits_: float) -> int:
    """The largest packed file accepted for a model of size_bits: 10 % + 16 KiB over size_bits/8."""
    return int(1.10 * size_bits_ / 8 + 16 * 1024)


# ------------------------------------------------------------------------------------------
# reference model and checks


def model_from_state_dict(state_dict: dict[str, torch.Tensor], cfg: TrainConfig) -> Ensemble:
    """The trained quantized model as trainables evaluates it: model.pt in a fresh EnResNet."""
    model = build_model(**architecture(state_dict, cfg))
    model.load_state_dict(state_dict)
    return model.eval()


def example_input(header: dict[str, Any], n: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs in [0, 1] of the model's shape (32x32 where the image size is unknown)."""
    side = header.get("image_size") or 32
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, header["arch"]["in_channels"], side, side), generator=g)


def logits(model: nn.Module, x: torch.Tensor, *, noise_on: bool, seed: int = 0) -> torch.Tensor:
    with torch.no_grad(), noise(model, noise_on), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.eval()(x)


def check_packed(path: str | Path, reference: nn.Module, x: torch.Tensor | None = None) -> list[str]:
    """Reload `path` and compare with `reference` (the trained quantized model): logits equal with
    the noise off and with the noise on under the same seed, file within the size bound. Returns
    the failures, one line each (empty: all good)."""
    packed = load_packed(path)
    x = example_input(packed.header) if x is None else x
    problems = []
    for on in (False, True):
        a, b = logits(reference, x, noise_on=on), logits(packed.model, x, noise_on=on)
        if not torch.equal(a, b):
            problems.append(f"logits differ (noise {'on, same seed' if on else 'off'}): max |diff| "
                            f"{(a - b).abs().max().item():.3g}")
    ref_state = reference.state_dict()
    for k, v in packed.model.state_dict().items():
        if not k.endswith("num_batches_tracked") and not torch.equal(v, ref_state[k].float()):
            problems.append(f"{k} does not decode to the trained weights")
            break
    size, bound = Path(path).stat().st_size, size_bound(packed.header["size_bits"])
    if size > bound:
        problems.append(f"{size} bytes > {bound} (size_bits/8 * 1.1 + 16 KiB)")
    return problems


def config_from_flat(flat: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a checkpoint's "config" (or a Tune trial's params)."""
    try:
        cfg = TrainConfig.from_flat(training_config(flat))
        cfg.quant.validate()
    except ConfigError as e:
        raise ExportError(f"the run's config: {e}") from None
    return cfg
