"""Shared fixtures, and one torch thread per pytest worker."""

import os
import shutil
import tempfile
from pathlib import Path

# One thread per worker, set before torch is imported: the suite runs two pytest-xdist workers on
# two cores, and torch's default (a thread per core in each worker, plus the processes the tests
# start) oversubscribes them, which on a loaded machine makes the fast layer many times slower
# (docs/testing.md). The environment variables reach every subprocess a test starts (the training
# CLI, sweeps, Ray's workers, which keep an OMP_NUM_THREADS they are given).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from trainables.data import extract_tar  # noqa: E402

torch.set_num_threads(1)

# property tests (tests/test_properties.py): no per-example deadline (a loaded 2-core machine
# stalls for seconds); `--hypothesis-profile=mutmut` makes them deterministic and cheaper, so a
# mutant is killed or not for the same reason on every run
settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("mutmut", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")

# End-to-end tests are marked `slow` (pytest -m "not slow" is the fast layer, docs/testing.md).
# Modules that are end to end throughout are marked here, so a test added to them later is too;
# a test elsewhere that starts Ray, a subprocess or a sweep carries @pytest.mark.slow itself,
# and so does any test that uses one of these fixtures.
E2E_MODULES = {"test_reliability.py"}
E2E_FIXTURES = {"sweep", "sweep4", "diverged_sweep", "ternary_run", "cli_results", "cifar10_folder", "ray_session"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads xdist_group into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in E2E_MODULES or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def _shares_a_module_fixture(item) -> bool:
    """The suite runs on two pytest-xdist workers (`--dist loadgroup`, pyproject.toml). A
    module-scoped fixture is a sweep or a training run made once for its module: the tests that
    use it go to one worker (one group per module) so it still runs once; every other test is
    handed out on its own, which is what spreads the long fault tests over both workers."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(defs and defs[-1].scope == "module"
               for defs in (info.name2fixturedefs.get(n) for n in info.names_closure))

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
