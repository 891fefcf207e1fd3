"""Datasets as in-memory tensors, batched and augmented on the training device.

The datasets here are small (CIFAR-10 is 150 MB as uint8), so holding them as tensors and slicing
batches beats a DataLoader: no worker processes per trial, no per-sample Python.

Splits are fixed by a data seed that does not depend on the trial seed, so every trial of a sweep
trains, selects and is evaluated on the same images.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig, check_dataset
from .fileio import node_lock

DATA_SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class DataError(ConfigError):
    """Data that cannot be found or read; reported like any other bad input."""


@dataclass
class Split:
    x: torch.Tensor  # N x C x H x W, uint8 (0..255) or float in [0, 1]
    y: torch.Tensor  # N, int64

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor | slice) -> Split:
        return Split(self.x[idx], self.y[idx])

    def to_float(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x.to(device)
        return as_float(x), self.y.to(device)

    def to(self, device: torch.device | str) -> Split:
        """The same split on `device`, still uint8 (a quarter of the float size): done once per
        run, so no training step copies images from the host."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    augment: bool

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])


def load_data(cfg: TrainConfig) -> DataBundle:
    """Load cfg.dataset, hold out the validation split and apply the subsets."""
    check_dataset(cfg.dataset)
    train, test, num_classes = _load_raw(cfg.dataset, os.path.expanduser(cfg.data_root), cfg.download,
                                         cfg.subset_train, cfg.subset_test)
    g = torch.Generator().manual_seed(DATA_SEED)
    perm = torch.randperm(len(train), generator=g)
    if cfg.subset_train is not None:
        perm = perm[: cfg.subset_train]
    n_val = int(round(cfg.val_fraction * len(perm)))
    if cfg.val_fraction > 0:
        n_val = max(1, n_val)
    if len(perm) - n_val < 1:
        raise DataError(f"subset_train={cfg.subset_train} leaves no training images; accepted: a larger subset")
    val, train = train.take(perm[:n_val]), train.take(perm[n_val:])
    if cfg.subset_test is not None and cfg.subset_test < len(test):
        test = test.take(torch.randperm(len(test), generator=g)[: cfg.subset_test])
    augment = cfg.augment
    if augment is None:  # crop + flip only where the reference uses it: 32x32 colour images
        augment = train.x.shape[1] == 3 and train.x.shape[-1] >= 32 and cfg.dataset != "svhn"
    return DataBundle(cfg.dataset, train, val, test, num_classes, bool(augment))


def _load_raw(name: str, root: str, download: bool, subset_train: int | None,
              subset_test: int | None) -> tuple[Split, Split, int]:
    if name == "digits":
        return _digits()
    if name.startswith("folder:"):
        return _folder(name[len("folder:"):], subset_train, subset_test)
    return _torchvision(name, root, download)


@lru_cache(maxsize=1)
def _digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # 1797 x 1 x 8 x 8
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(DATA_SEED))
    n_test = len(y) // 5
    full = Split(x, y)
    return full.take(perm[n_test:]), full.take(perm[:n_test]), 10


def _torchvision(name: str, root: str, download: bool) -> tuple[Split, Split, int]:
    with node_lock(root, name) if download else contextlib.nullcontext():
        return _torchvision_unlocked(name, root, download)


def _torchvision_unlocked(name: str, root: str, download: bool) -> tuple[Split, Split, int]:
    import torchvision.datasets as tvd

    def fetch(split_train: bool):
        try:
            if name == "cifar10":
                ds = tvd.CIFAR10(root, train=split_train, download=download)
                return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
            if name in ("mnist", "fashion-mnist"):
                cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
                ds = cls(root, train=split_train, download=download)
                return ds.data.unsqueeze(1).contiguous(), ds.targets.clone()
            if name == "svhn":
                ds = tvd.SVHN(root, split="train" if split_train else "test", download=download)
                return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
        except RuntimeError as e:
            if "not found" in str(e).lower() or "corrupted" in str(e).lower():
                raise DataError(
                    f"dataset {name!r} not found under data_root={root!r} on node {socket.gethostname()}; "
                    f"pass --download to fetch it where each trial runs, or --data-root pointing at a copy "
                    f"every node has (a shared mount)"
                ) from None
            raise
        raise DataError(f"unknown dataset {name!r}")

    xtr, ytr = fetch(True)
    xte, yte = fetch(False)
    return Split(xtr, ytr.long()), Split(xte, yte.long()), int(max(ytr.max(), yte.max())) + 1


def _list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for i, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(i)
    return files, labels


def _decode(files: list[Path]) -> torch.Tensor:
    from PIL import Image

    with Image.open(files[0]) as im0:
        mode = "L" if im0.mode in ("L", "1", "I", "I;16") else "RGB"
        size = im0.size

    def read(f: Path) -> np.ndarray:
        with Image.open(f) as im:
            im = im.convert(mode)
            if im.size != size:
                im = im.resize(size)
            return np.asarray(im, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as ex:
        arrs = list(ex.map(read, files))
    x = torch.from_numpy(np.stack(arrs))
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


@lru_cache(maxsize=4)
def _folder(path: str, subset_train: int | None, subset_test: int | None) -> tuple[Split, Split, int]:
    """A tree with train/<class>/ and test/<class>/ images. Only the images a subset uses are
    decoded (the same fixed permutation that load_data applies), so quick runs start fast."""
    root = Path(os.path.expanduser(path))
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(
            f"folder dataset {path!r} needs train/<class>/ and test/<class>/ image folders; "
            f"unpack the data there or pass another folder:PATH"
        )
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"folder dataset {path!r} has no class folders under train/")
    out = []
    g = torch.Generator().manual_seed(DATA_SEED)
    for split, subset in (("train", subset_train), ("test", subset_test)):
        files, labels = _list_images(root / split, classes)
        if not files:
            raise DataError(f"folder dataset {path!r} has no images under {split}/")
        y = torch.tensor(labels, dtype=torch.long)
        keep = torch.arange(len(files))
        if subset is not None and subset < len(files):
            # mirror load_data: the first `subset` entries of the data-seed permutation
            keep = torch.randperm(len(files), generator=g)[:subset]
            keep_sorted = keep.sort().values
            dec = _decode([files[i] for i in keep_sorted.tolist()])
            x = torch.zeros((len(files),) + tuple(dec.shape[1:]), dtype=torch.uint8)
            x[keep_sorted] = dec
        else:
            if split == "train":
                torch.randperm(len(files), generator=g)  # keep the generator in step
            x = _decode(files)
        out.append(Split(x, y))
    return out[0], out[1], len(classes)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as float32 (uint8 is scaled by 1/255)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@dataclass
class EpochPlan:
    """One epoch's sample order and augmentation draws, on the training device.

    Everything random is drawn up front from the run's CPU generator (so the stream, and a
    resumed run, do not depend on the device) and copied to the device in one go per epoch:
    the steps themselves only slice these tensors."""

    order: torch.Tensor  # N, int64: a permutation of the split
    shifts: torch.Tensor | None  # 2 x N crop offsets in [0, 2*pad], or None without augmentation
    flips: torch.Tensor | None  # N, bool
    batch_size: int
    pad: int = 4

    @classmethod
    def draw(cls, n: int, batch_size: int, generator: torch.Generator, augment: bool,
             device: torch.device | str, pad: int = 4) -> EpochPlan:
        order = torch.randperm(n, generator=generator)
        shifts = flips = None
        if augment:
            shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
            flips = torch.rand(n, generator=generator) < 0.5
        nb = device.type == "cuda" if isinstance(device, torch.device) else str(device).startswith("cuda")
        move = (lambda t: t if t is None else t.to(device, non_blocking=nb))
        return cls(move(order), move(shifts), move(flips), batch_size, pad)

    def slices(self, min_size: int = 2) -> list[slice]:
        """Batch boundaries (plain ints: no device read); batches under min_size are skipped
        (BatchNorm needs two samples)."""
        n = len(self.order)
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)
                if min(i + self.batch_size, n) - i >= min_size]

    def batch(self, split: Split, s: slice, memory_format: torch.memory_format = torch.contiguous_format
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float batch of `split` (already on the device) at slice s, augmented per plan.
        Gather and crop run on the uint8 images; the float copy is made once, in memory_format."""
        idx = self.order[s]
        x = split.x.index_select(0, idx)
        if self.shifts is not None:
            x = crop_flip(x, self.shifts[:, s], self.flips[s], self.pad)
        return as_float(x).contiguous(memory_format=memory_format), split.y.index_select(0, idx)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, vectorised over the batch (draws from a
    CPU generator; training draws a whole epoch at once, see EpochPlan)."""
    n = x.shape[0]
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return crop_flip(x, shifts, flip, pad).contiguous()


def crop_flip(x: torch.Tensor, shifts: torch.Tensor, flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each padded image at its offsets (shifts: 2 x n) and mirror it where flip is set:
    one gather for the whole batch, on x's device, no per-sample Python. Works on uint8 or
    float; the result is laid out channels-last (call .contiguous() for NCHW)."""
    n, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    iy = torch.arange(h, device=dev)[None, :] + shifts[0][:, None]  # n x h
    ix = torch.arange(w, device=dev)[None, :] + shifts[1][:, None]  # n x w
    ix = torch.where(flip[:, None], ix.flip(1), ix)
    b = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, iy[:, :, None], ix[:, None, :]]  # n x h x w x c
    return out.permute(0, 3, 1, 2)


def check_available(cfg: TrainConfig) -> None:
    """Fail fast, before any work starts, if cfg's data cannot be loaded; decodes nothing."""
    check_dataset(cfg.dataset)
    name = cfg.dataset
    if name == "digits":
        return
    if name.startswith("folder:"):
        root = Path(os.path.expanduser(name[len("folder:"):]))
        for split in ("train", "test"):
            d = root / split
            if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
                raise DataError(
                    f"folder dataset {str(root)!r} needs train/<class>/ and test/<class>/ image folders; "
                    f"unpack the data there or pass another folder:PATH"
                )
        return
    if not cfg.download:
        _torchvision(name, os.path.expanduser(cfg.data_root), False)


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack a .tar(.gz) into dest; the tar program is far faster than tarfile for 60k small files."""
    if shutil.which("tar"):
        subprocess.run(["tar", "xzf" if str(archive).endswith("gz") else "xf", str(archive),
                        "-C", str(dest)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")


def unpack_archive(archive: Path, cache: Path, name: str = "cifar10-jpeg") -> Path:
    """Unpack an image-tree archive once into cache/name and return that folder, for `folder:`.

    The archive is unpacked beside the destination and renamed into place, and a marker records
    which archive it came from, so an interrupted unpack is never mistaken for a finished one and
    every tool pointed at the same cache (`python -m report`, the benchmarks) shares one copy."""
    dest = cache / name
    marker = dest / ".unpacked-from"
    stamp = f"{archive.resolve()} {archive.stat().st_size}"
    if marker.is_file() and marker.read_text().strip() == stamp:
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    try:
        extract_tar(archive, tmp)
        (tmp / ".unpacked-from").write_text(stamp + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
