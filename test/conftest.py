"""Shared pytest setup.

Without a GPU, TRITON_INTERPRET=1 is set before any kernel module is imported (``@triton.jit``
reads it when a kernel is decorated): the Triton kernels then run on CPU tensors through the
interpreter, which is how test/kernels checks them. Package code never launches Triton on CPU
tensors (see quantframe.kernels.use_triton), so the rest of the suite is unaffected. On a GPU
machine run `pytest -m gpu` (the CPU-tensor kernel tests need the interpreter).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
