"""quantframe.kernels.call_op: eager calls that need no autograd graph skip the custom-op dispatcher
and run the op's implementation straight; grad-requiring and traced calls go through the op."""

import pytest
import torch

import quantframe.kernels.affine_mm as affine_mm_module
from quantframe import AffineQuantizedTensor
from quantframe.kernels import call_op


class _Counted:
    """A stand-in for an op or its implementation that records each call."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, x, y):
        self.calls.append(self.name)
        return x * y


@pytest.mark.parametrize(
    "grad_mode, requires_grad, taken",
    [(True, False, "impl"), (False, True, "impl"), (False, False, "impl"), (True, True, "op")],
    ids=["no-grad-wanted", "grad-off", "neither", "autograd"],
)
def test_the_implementation_runs_unless_autograd_needs_the_op(grad_mode, requires_grad, taken):
    calls = []
    x = torch.randn(3, requires_grad=requires_grad)
    with torch.set_grad_enabled(grad_mode):
        call_op(_Counted("op", calls), _Counted("impl", calls), x, torch.randn(3))
    assert calls == [taken]


def test_a_grad_requiring_later_argument_also_takes_the_op():
    calls = []
    call_op(_Counted("op", calls), _Counted("impl", calls), torch.randn(3), torch.randn(3, requires_grad=True))
    assert calls == ["op"]


def test_fake_tensors_take_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3))
        call_op(_Counted("op", calls), _Counted("impl", calls), x, x)
    assert calls == ["op"]


def test_affine_launcher_skips_the_op_in_eager_inference_and_not_for_training(monkeypatch):
    # the module-level name is what call_op gets; the registered op keeps the original function
    seen = []
    impl = affine_mm_module._affine_mm_impl

    def spy(*args):
        seen.append(args[0].shape)
        return impl(*args)

    monkeypatch.setattr(affine_mm_module, "_affine_mm_impl", spy)
    q = AffineQuantizedTensor.from_float(torch.randn(24, 64), bits=4, group_size=32, symmetric=False)
    x = torch.randn(1, 64)
    with torch.no_grad():
        direct = affine_mm_module.affine_mm_triton(x, q.qdata, q.scale, q.zero_point, 4, 32)
    assert len(seen) == 1
    xg = x.detach().requires_grad_()
    through_op = affine_mm_module.affine_mm_triton(xg, q.qdata, q.scale, q.zero_point, 4, 32)
    assert len(seen) == 1  # the op path: autograd records its backward
    torch.testing.assert_close(direct, through_op.detach(), atol=0, rtol=0)
    through_op.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_the_implementation_runs_with_wrap_triton_off_as_a_triton_op_runs_it():
    # with wrap_triton on (its default outside a triton_op) every eager launch goes through the
    # tracing HOP (~600 us of Python); off, wrap_triton(kernel) is the kernel itself
    from torch._library.triton import is_wrap_triton_enabled

    seen = []
    with torch.no_grad():
        call_op(None, lambda x: seen.append(is_wrap_triton_enabled()), torch.randn(2))
    assert seen == [False] and is_wrap_triton_enabled()


def test_launcher_wraps_only_traced_launches(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from quantframe.kernels import _weight_mm

    # (under the interpreter wrap_triton returns the kernel itself: observe the call instead)
    monkeypatch.setattr(_weight_mm, "wrap_triton", lambda k: ("wrapped", k))
    kernel = affine_mm_module._affine_dequantize_kernel
    assert _weight_mm.launcher(kernel, torch.randn(2)) is kernel
    with FakeTensorMode() as mode:
        assert _weight_mm.launcher(kernel, mode.from_tensor(torch.randn(2))) == ("wrapped", kernel)


@torch.library.custom_op("quantframe_test::scaled", mutates_args=())
def _scaled_op(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * y


@_scaled_op.register_fake
def _(x, y):
    return torch.empty_like(x)


def test_compiled_callers_trace_the_op_without_a_graph_break():
    # under dynamo call_op must take the op (the tracer sees it); fullgraph fails on any graph break
    impl_calls = []

    def impl(x, y):
        impl_calls.append(1)
        return x * y

    def f(x, y):
        return call_op(torch.ops.quantframe_test.scaled, impl, x, y) + 1

    torch._dynamo.reset()
    x, y = torch.randn(4), torch.randn(4)
    with torch.no_grad():
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    torch.testing.assert_close(out, x * y + 1)
    assert impl_calls == []
