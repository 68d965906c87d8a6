"""Triton kernels, installed as ``quantframe.kernels``: plain tensors in, plain tensors out.

Each family lives in one file with its ``@triton.jit`` kernels, a ``<op>_triton`` launcher, a
pure-PyTorch ``<op>_reference`` with the same signature, and ``<op>``, which picks between them
with :func:`use_triton`. Kernel modules import triton at their top; the package imports them
lazily, so ``import quantframe`` works without triton.

Launches: inside a ``triton_op`` a kernel runs as ``wrap_triton(kernel)[grid](...)`` (torch.compile
traces it); eager callers reach it through :func:`call_op`, and code outside any op through
``_weight_mm.launcher``, so that no eager launch goes through the tracing HOP
(test/test_eager_launch.py).
"""

from __future__ import annotations

import torch

__all__ = ["call_op", "is_traced", "use_triton"]


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


def call_op(op, impl, *args):
    """``op(*args)``, a ``triton_op``, or its implementation ``impl(*args)`` straight where the op has
    nothing to add: outside tracing (``args[0]`` real) and with no autograd graph to record (grad mode
    off, or no tensor argument that requires grad). Same kernels, same result. The dispatcher's
    custom-op path (autograd key, redispatch) costs ~13 µs of Python a call on the CPU machine.

    ``impl`` runs as ``triton_op`` runs it, with ``wrap_triton`` off: ``wrap_triton(kernel)[grid](...)``
    then launches the kernel itself, where with it on (the default outside a ``triton_op``) every eager
    launch goes through the tracing HOP (argument flattening, ``inspect.signature``, an ``exec``):
    ~600 µs of Python a call on the CPU machine."""
    if _set_wrap_triton is None:
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return op(*args)
    if is_traced(args[0]):
        return op(*args)
    with _set_wrap_triton(False):
        return impl(*args)


try:  # how triton_op runs its function (torch >= 2.6); without it call_op always takes the op
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton
except ImportError:  # pragma: no cover - older torch
    _set_wrap_triton = None
