"""Eager calls launch their Triton kernels directly, never through torch's tracing HOP.

``wrap_triton(kernel)[grid](...)`` outside a ``triton_op`` (and outside ``call_op``'s direct path)
goes through ``triton_kernel_wrapper_mutation`` even in eager: argument flattening,
``inspect.signature``, an ``exec``, ~600 µs of Python a launch on the CPU machine, which made eager
decode and small prefill calls host-bound on the GPU. This runs every inference format the way a
GPU would take it (the dispatch rule says CUDA), with Triton's own launch replaced by a counter
(no GPU here), in a fresh process without ``TRITON_INTERPRET`` (the interpreter skips the HOP), and
fails if any launch reaches the HOP. Training (forward, backward, optimizer step) of the three
training schemes too.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, torch, triton
    from torch import nn
    from torch._higher_order_ops import triton_kernel_wrap

    launches = []
    triton.runtime.autotuner.Autotuner.run = lambda self, *a, **k: launches.append(1)
    triton.runtime.jit.JITFunction.run = lambda self, *a, **k: launches.append(1)

    def hop(*args, **kwargs):
        raise AssertionError("an eager launch went through wrap_triton's tracing HOP")

    triton_kernel_wrap.tracing_triton_hopifier_singleton.call_triton_kernel = hop

    import quantframe, quantframe.kernels as K
    names = [f"quantframe.kernels.{m.name}" for m in pkgutil.iter_modules(K.__path__)]
    names += [f"quantframe.{m.name}" for m in pkgutil.iter_modules(quantframe.__path__)]
    for name in names:
        module = importlib.import_module(name)
        if hasattr(module, "use_triton"):
            module.use_triton = lambda t: True  # take the CUDA paths
    from quantframe import (quantize_, int8_weight_only, int4_weight_only, int8_dynamic_activation_int8_weight,
                            nf4_weight_only, ternary_weight_only)

    configs = {"int8": int8_weight_only, "int4": lambda: int4_weight_only(group_size=64),
               "w8a8": int8_dynamic_activation_int8_weight, "nf4": nf4_weight_only, "ternary": ternary_weight_only}
    for name, config in configs.items():
        for rows in (1, 4, 17):  # GEMV, skinny GEMM, the dense path
            layer = nn.Linear(256, 64, bias=False, dtype=torch.bfloat16)
            quantize_(layer, config())
            before = len(launches)
            with torch.no_grad():
                layer(torch.randn(rows, 256, dtype=torch.bfloat16))
            assert len(launches) > before, (name, rows, "no Triton launch: the test no longer reaches the kernels")

    from quantframe import bitnet_training, int8_mixed_precision_training, int8_weight_only_quantized_training
    from quantframe.optim import AdamW

    training = {"int8-qt": int8_weight_only_quantized_training, "int8-mp": int8_mixed_precision_training,
                "bitnet": bitnet_training}
    for name, config in training.items():
        for rows in (4, 17):  # forward, backward and the optimizer step
            layer = nn.Linear(256, 64, bias=False, dtype=torch.bfloat16)
            quantize_(layer, config())
            before = len(launches)
            x = torch.randn(rows, 256, dtype=torch.bfloat16, requires_grad=True)
            layer(x).float().sum().backward()
            AdamW(layer.parameters(), lr=1e-3).step()
            assert len(launches) > before, (name, rows, "no Triton launch: the test no longer reaches the kernels")
    print("ok", len(launches))
    """
)


def test_eager_inference_launches_skip_the_tracing_hop():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.startswith("ok")
