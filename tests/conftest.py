import os
import warnings

import pytest
import torch

# The tests are small; more threads than cores only adds noise on the 2-core CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message="fastadv: no compiled kernels for device")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    """For tests of tiny models: one intra-op thread is as fast, gives the same reduction order in every run,
    and does not spin-wait when other processes share the two cores. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def restore_method_registry():
    """Leave fastadv.train's method registry as it was (LM-VP training registers its methods there)."""
    from fastadv.train import METHODS

    saved = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(saved)
