"""Shared test helpers: where ../shared is, and skipping when it is absent."""
import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('AOT_SHARED_DIR', REPO.parent / 'shared'))


REQUIRE_SHARED_ENV = 'AOT_REQUIRE_SHARED'


def shared_path(*parts):
    """Path inside ../shared; skips the calling test with a reason when it is absent, or fails
    it when ``AOT_REQUIRE_SHARED=1`` (CI: a missing fixture must not hide a broken test)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = (f'needs {path} (the shared reference folder next to the checkout; '
                  f'set AOT_SHARED_DIR to point elsewhere)')
        if os.environ.get(REQUIRE_SHARED_ENV, '') not in ('', '0'):
            pytest.fail(f'{reason}, and {REQUIRE_SHARED_ENV} is set, so this is an error',
                        pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The golden fixtures were made with 2 threads; results are reproducible only to
    # ~1e-6 across thread counts, which the tolerances cover.
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the same thread count everywhere (spawned training
    processes get 1 each, so results are bit-identical), and tiny models on a loaded 2-core
    machine are much slower with more. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long-running test (deselect with -m "not slow")')
