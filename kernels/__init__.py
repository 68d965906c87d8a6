"""Triton kernels, installed as ``quantframe.kernels``: plain tensors in, plain tensors out.

Each family lives in one file with its ``@triton.jit`` kernels, a ``<op>_triton`` launcher, a
pure-PyTorch ``<op>_reference`` with the same signature, and ``<op>``, which picks between them
with :func:`use_triton`. Kernel modules import triton at their top; the package imports them
lazily, so ``import quantframe`` works without triton.
"""

from __future__ import annotations

import torch

__all__ = ["use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    """The one dispatch rule: CUDA tensors take the Triton kernels, everything else the reference.

    Kernel tests on CPU call the ``*_triton`` launchers directly under ``TRITON_INTERPRET=1``.
    """
    return t.is_cuda
