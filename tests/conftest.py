"""Shared fixtures."""

import shutil
import tempfile
from pathlib import Path

import pytest

from trainables.data import extract_tar

# CI clones the repository into its own folder with shared/ beside it
CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"
SHM = Path("/dev/shm")


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory):
    """The shared CIFAR-10 JPEG copy unpacked once per session (train/<class>/, test/<class>/);
    the test is skipped where the archive is absent.

    60,000 small files unpack in about a second on tmpfs but can take minutes on a busy disk,
    so /dev/shm is used when it has room (and emptied afterwards)."""
    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"{CIFAR10_JPEG} not found")
    on_shm = SHM.is_dir() and shutil.disk_usage(SHM).free > 1 << 30
    root = Path(tempfile.mkdtemp(prefix="cifar10-jpeg-", dir=SHM)) if on_shm \
        else tmp_path_factory.mktemp("cifar10-jpeg")
    try:
        extract_tar(CIFAR10_JPEG, root)
        yield root
    finally:
        if on_shm:
            shutil.rmtree(root, ignore_errors=True)
