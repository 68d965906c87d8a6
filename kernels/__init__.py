"""Triton kernels, installed as ``quantframe.kernels``: plain tensors in, plain tensors out.

Each family lives in one file with its ``@triton.jit`` kernels, a ``<op>_triton`` launcher, a
pure-PyTorch ``<op>_reference`` with the same signature, and ``<op>``, which picks between them
with :func:`use_triton`. Kernel modules import triton at their top; the package imports them
lazily, so ``import quantframe`` works without triton.
"""

from __future__ import annotations

import torch

__all__ = ["is_traced", "use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    """The one dispatch rule: CUDA tensors take the Triton kernels, everything else the reference.

    Kernel tests on CPU call the ``*_triton`` launchers directly under ``TRITON_INTERPRET=1``.
    """
    return t.is_cuda


def is_traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is being traced rather than holding data: torch.compile / export (dynamo's fake
    runs and AOTAutograd's functional tracing included, where ``torch.compiler.is_compiling()``
    alone can be False). There, code must use ops the tracer can see through, not raw launches."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)
