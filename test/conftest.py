"""Shared pytest setup.

TRITON_INTERPRET must be set before triton is imported (``@triton.jit`` reads it when a kernel
is decorated): with it, the Triton kernels run on CPU tensors through the interpreter, which is
how test/kernels checks them without a GPU. Package code never launches Triton on CPU tensors
(see quantframe.kernels.use_triton), so the rest of the suite is unaffected.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
