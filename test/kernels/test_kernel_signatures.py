"""Every Triton kernel of quantframe.kernels takes all of its parameters from the call.

Under torch.compile a kernel launched through ``wrap_triton`` runs from inductor's generated launcher,
which takes every parameter of the kernel: one with a default that the call (or an autotune config)
leaves out raises ``launcher() missing ... required positional argument`` on the GPU only. Stop 16's
NF4 GEMV (double-quant pointers with defaults) broke compiled NF4 that way while every CPU test
passed; so no kernel parameter has a default, and each autotuned kernel's configs all set the
same constexprs.
"""

import importlib
import inspect
import pkgutil

import pytest
import triton

import quantframe.kernels as kernels


def _kernels():
    """(module.name, python function, autotune configs or None) of each kernel; the jit wrapper is
    a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1."""
    jit_types = (triton.runtime.jit.JITFunction, triton.runtime.interpreter.InterpretedFunction)
    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in vars(module).items():
            wrapper, configs = obj, None
            while not isinstance(wrapper, jit_types) and hasattr(wrapper, "fn"):
                configs = getattr(wrapper, "configs", configs)
                wrapper = wrapper.fn
            if isinstance(wrapper, jit_types) and wrapper.fn.__module__ == module.__name__:
                found.append((f"{info.name}.{name}", wrapper.fn, configs))
    return found


KERNELS = _kernels()


def test_the_kernels_are_found():
    names = {name for name, _, _ in KERNELS}
    assert {"nf4_mm._nf4_gemv_kernel", "nf4_mm._nf4_gemm_kernel", "affine_mm._affine_gemv_kernel"} <= names


@pytest.mark.parametrize("name, fn, configs", KERNELS, ids=[name for name, _, _ in KERNELS])
def test_no_parameter_has_a_default(name, fn, configs):
    defaulted = [p.name for p in inspect.signature(fn).parameters.values() if p.default is not p.empty]
    assert defaulted == [], f"{name}: parameters with defaults {defaulted} (pass them at every call)"


@pytest.mark.parametrize("name, fn, configs", [k for k in KERNELS if k[2]], ids=[k[0] for k in KERNELS if k[2]])
def test_autotune_configs_all_set_the_same_constexprs(name, fn, configs):
    keys = {tuple(sorted(c.kwargs)) for c in configs}
    assert len(keys) == 1, f"{name}: configs set different constexprs {sorted(keys)}"


BUILDERS = [
    ("dora", "_norm_configs"), ("dora", "_linear_configs"), ("int8_mm", "_gemv_configs"),
    ("int8_weight_mm", "_configs"), ("nf4_mm", "_gemv_configs"), ("nf4_mm", "_gemm_configs"),
    ("ternary_mm", "_gemv_configs"), ("ternary_mm", "_gemm_configs"), ("ternary_mm", "_token_configs"),
]  # fmt: skip


@pytest.mark.parametrize("module, builder", BUILDERS, ids=[f"{m}.{b}" for m, b in BUILDERS])
def test_gpu_config_lists_all_set_the_same_constexprs(monkeypatch, module, builder):
    # The interpreter's lists are short; the GPU's (built when not interpreted) are what inductor sees
    from quantframe.kernels import _weight_mm

    monkeypatch.setattr(_weight_mm, "interpreted", lambda: False)
    configs = getattr(importlib.import_module(f"{kernels.__name__}.{module}"), builder)()
    keys = {tuple(sorted(c.kwargs)) for c in configs}
    assert len(keys) == 1, f"{module}.{builder}: configs set different constexprs {sorted(keys)}"
