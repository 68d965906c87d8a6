"""quantframe.kernels.nf4_mm: reference vs float64 dequantize-then-matmul; Triton vs reference.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py).
"""

import pytest
import quantframe.kernels.nf4_mm as nf4_mm_module
import torch
import torch.nn.functional as F
from quantframe.kernels.nf4_mm import (
    nf4_block_scales,
    nf4_block_scales_reference,
    nf4_block_scales_triton,
    nf4_dequantize,
    nf4_dequantize_triton,
    nf4_mm,
    nf4_mm_dense,
    nf4_mm_double_quant,
    nf4_mm_grad_input,
    nf4_mm_reference,
    nf4_mm_triton,
)

from quantframe.nf4 import NF4_LEVELS, NF4Tensor, _level_table
from quantframe.testing import LaunchSpy, assert_close_at_scale, assert_matches_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol) of Triton vs reference: both accumulate in fp32 in another order (and the GEMM
# rounds W to x's 16-bit dtype on a GPU), which can flip the final rounding by one ulp.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
LEVELS = torch.tensor(NF4_LEVELS)


def _weight(n, k, block_size):
    """(codes, scale) of random codes and positive block scales in the NF4Tensor layout."""
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    return codes, torch.rand(n * k // block_size) * 0.5 + 0.01


# ---- the double-quantized block scales: one launch ---------------------------------------------
@pytest.mark.parametrize("n_blocks, offset, sbs", [(1, 0, 256), (3000, 0, 256), (1030, 37, 64), (5, 3, 4)])
def test_block_scales_kernel_is_bit_exact(n_blocks, offset, sbs):
    torch.manual_seed(n_blocks)
    qs = torch.randint(-128, 128, (n_blocks,), dtype=torch.int8)
    scaler_scale = torch.rand((offset + n_blocks - 1) // sbs + 1) * 1e-3
    mean = torch.tensor(0.0173)
    ref = nf4_block_scales_reference(qs, scaler_scale, mean, offset, sbs)
    assert torch.equal(nf4_block_scales_triton(qs, scaler_scale, mean, offset, sbs), ref)
    assert torch.equal(nf4_block_scales(qs, scaler_scale, mean, offset, sbs), ref)  # CPU: torch ops


def test_block_scales_of_a_window_match_the_whole_weight():
    # a row window of an NF4 weight starts inside a scaler block (scaler_offset != 0)
    q = NF4Tensor.from_float(torch.randn(64, 256), block_size=64, scaler_block_size=256)
    rows = q[5:9]
    assert rows.scaler_offset != 0
    whole = nf4_block_scales_triton(q.quantized_scalers, q.scaler_scale, q.scaler_mean, 0, 256)
    part = nf4_block_scales_triton(
        rows.quantized_scalers, rows.scaler_scale, rows.scaler_mean, rows.scaler_offset, 256
    )
    assert torch.equal(part, whole.view(64, -1)[5:9].reshape(-1))


# ---- one row with the scales made inside the GEMV (nf4_mm_double_quant) -------------------------
def _dq_args(q):
    return q.quantized_scalers, q.scaler_scale, q.scaler_mean, q.scaler_offset, q.scaler_block_size


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows, k", [(1, 256), (1, 128), (3, 256)], ids=["one-row", "one-row-K128", "3-rows"])
def test_double_quant_path_equals_the_scales_then_the_gemv(monkeypatch, rows, k, bias):
    # with the dispatch forced to the kernels (CPU tensors, interpreter): one row takes the one-launch
    # GEMV, bit for bit the GEMV fed the precomputed block scales; more rows take that general path
    torch.manual_seed(rows)
    q = NF4Tensor.from_float(torch.randn(40, k), block_size=64, scaler_block_size=16)
    b = torch.randn(40) if bias else None
    x = torch.randn(rows, k)
    monkeypatch.setattr(nf4_mm_module, "use_triton", lambda t: True)
    launched = []
    kernel = nf4_mm_module._nf4_gemv_kernel
    monkeypatch.setattr(nf4_mm_module, "_nf4_gemv_kernel", LaunchSpy(kernel, launched))
    y = nf4_mm_double_quant(x, q.codes, *_dq_args(q), LEVELS, 64, b)
    assert len(launched) == (1 if rows == 1 else 0)  # the general path launches through wrap_triton
    monkeypatch.setattr(nf4_mm_module, "_nf4_gemv_kernel", kernel)
    expected = nf4_mm_triton(x, q.codes, q.block_scales(), LEVELS, 64, b)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("block_n, block_k", [(16, 64), (8, 256)])
def test_double_quant_words_row_equals_precomputed_scales(block_n, block_k):
    # the words tiles (GPU) with the scales made inside, launched by hand: the same sums as with the
    # block scales precomputed, including a weight window that starts inside a scaler block
    import triton

    torch.manual_seed(0)
    whole = NF4Tensor.from_float(torch.randn(48, 256), block_size=64, scaler_block_size=16)
    q = whole[5:25]  # scaler_offset != 0
    assert q.scaler_offset != 0
    n, k = 20, 256
    x, outs = torch.randn(1, k), []
    for dq in (False, True):
        s2 = (q.quantized_scalers if dq else q.block_scales()).reshape(n, k // 64)
        y = torch.empty(1, n)
        nf4_mm_module._nf4_gemv_kernel.fn[(triton.cdiv(n, block_n),)](
            x, q.codes, s2, LEVELS, s2, y, 1, n, k, *x.stride(), *q.codes.stride(), *s2.stride(), *y.stride(),
            BLOCK_SIZE=64, HAS_BIAS=False, WORDS_OK=True, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, WORDS=True,
            ss_ptr=q.scaler_scale, mean_ptr=q.scaler_mean, q_offset=q.scaler_offset, DQ=dq, SBS=16,
        )  # fmt: skip
        outs.append(y)
    assert torch.equal(outs[0], outs[1])


def test_double_quant_path_reports_bad_arguments_as_nf4_mm():
    q = NF4Tensor.from_float(torch.randn(8, 128), scaler_block_size=16)
    with pytest.raises(ValueError, match="levels.shape"):
        nf4_mm_double_quant(torch.randn(1, 128), q.codes, *_dq_args(q), LEVELS[:8], 64)


@pytest.mark.gpu
def test_double_quant_gemv_matches_the_layer_on_cuda():
    # PTX mul.rn / add.rn: the scales made inside round as the separate kernel's do
    q = NF4Tensor.from_float(torch.randn(4096, 4096, device="cuda") * 0.02)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    lv = _level_table(q.device)
    y = nf4_mm_double_quant(x, q.codes, *_dq_args(q), lv, q.block_size)
    assert torch.equal(y, nf4_mm(x, q.codes, q.block_scales(), lv, q.block_size))


@pytest.mark.gpu
def test_block_scales_kernel_is_bit_exact_on_cuda():
    # the kernel is launched without FMA contraction: the product and the sum each rounded, as torch
    q = NF4Tensor.from_float(torch.randn(14336, 4096, device="cuda") * 0.02)
    args = (q.quantized_scalers, q.scaler_scale, q.scaler_mean, q.scaler_offset, q.scaler_block_size)
    assert torch.equal(nf4_block_scales_triton(*args), nf4_block_scales_reference(*args))


def _float64_linear(x, codes, scale, block_size, bias=None):
    """The obvious computation in float64: flat element e = NF4_LEVELS[code e] * scale[e // block_size]."""
    n, k = codes.shape[0], codes.shape[1] * 2
    w = torch.empty(n * k, dtype=torch.float64)
    flat = codes.reshape(-1).tolist()
    for e in range(n * k):
        code = flat[e // 2] >> 4 if e % 2 == 0 else flat[e // 2] & 15  # element 2j: high nibble
        w[e] = NF4_LEVELS[code] * scale[e // block_size].double()
    y = x.double() @ w.view(n, k).T
    return y if bias is None else y + bias.double()


# ---- reference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, block_size", [(7, 64, 64), (5, 64, 32), (6, 32, 64)], ids=["bs64", "bs32", "flat"])
def test_reference_matches_float64_dequantize_then_matmul(n, k, block_size):
    # "flat": K=32 < block_size, a block spans two rows of the flat weight (a view of an NF4Tensor)
    codes, scale = _weight(n, k, block_size)
    x, bias = torch.randn(2, 5, k), torch.randn(n)
    y = nf4_mm_reference(x, codes, scale, LEVELS, block_size, bias)
    assert y.dtype == torch.float32 and y.shape == (2, 5, n)
    torch.testing.assert_close(y.double(), _float64_linear(x, codes, scale, block_size, bias), atol=1e-5, rtol=1e-5)


def test_hand_worked_values():
    # byte 0x7F: element 0 = code 7 (0.0), element 1 = code 15 (1.0); byte 0x08: codes 0 (-1.0), 8
    codes = torch.tensor([[0x7F, 0x08]], dtype=torch.uint8)
    x = torch.tensor([[5.0, 2.0, 3.0, 1.0]])
    # W = [0, 1, -1, 0.0796] * [2, 2 | 0.5, 0.5] = [0, 2, -0.5, 0.0398]: y = 4 - 1.5 + 0.0398
    y = nf4_mm_reference(x, codes, torch.tensor([2.0, 0.5]), LEVELS, 2)
    torch.testing.assert_close(y, torch.tensor([[2.5 + NF4_LEVELS[8] * 0.5]]))


def test_reference_is_the_nf4_tensor_linear_on_cpu():
    q = NF4Tensor.from_float(torch.randn(32, 64), 32, 4)
    x, bias = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)
    y = nf4_mm_reference(x, q.codes, q.block_scales(), LEVELS, 32, bias)
    assert torch.equal(y, F.linear(x, q, bias))
    assert torch.equal(y, F.linear(x.float(), q.dequantize(torch.float32), bias.float()).bfloat16())


# ---- Triton vs reference -----------------------------------------------------------------------
def _cases():
    for m in (1, 5, 16, 33):  # GEMV up to 16 rows, GEMM above
        for dname, dtype in DTYPES.items():
            has_bias = (m + len(dname)) % 2 == 1  # half the cases, alternating over M
            yield pytest.param(m, dtype, has_bias, id=f"M{m}-{dname}{'-bias' if has_bias else ''}")


@pytest.mark.parametrize("m, dtype, has_bias", list(_cases()))
def test_triton_matches_reference(m, dtype, has_bias):
    n, k, bs = 24, 128, 64
    codes, scale = _weight(n, k, bs)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if has_bias else None
    y = nf4_mm_triton(x, codes, scale, LEVELS, bs, bias)
    y_ref = nf4_mm_reference(x, codes, scale, LEVELS, bs, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("m", [3, 20], ids=["gemv", "gemm"])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_triton_takes_other_block_sizes(m, block_size):
    codes, scale = _weight(9, 128, block_size)
    x = torch.randn(m, 128)
    torch.testing.assert_close(
        nf4_mm_triton(x, codes, scale, LEVELS, block_size),
        nf4_mm_reference(x, codes, scale, LEVELS, block_size),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("m", [3, 20], ids=["gemv", "gemm"])
def test_triton_takes_3d_strided_input_and_a_row_sliced_weight(m):
    q = NF4Tensor.from_float(torch.randn(40, 64), 32, 4)[8:24]  # a view: scaler_offset 16
    x = torch.randn(2, m, 128)[..., ::2]  # every other column: the kernels read x through strides
    args = (q.codes, q.block_scales(), LEVELS, 32)
    y = nf4_mm_triton(x, *args)
    assert y.shape == (2, m, 16)
    torch.testing.assert_close(y, nf4_mm_reference(x, *args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, x @ q.dequantize(torch.float32).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [3, 20], ids=["gemv", "gemm"])
def test_triton_takes_empty_batch_and_gradients_reach_x_and_bias(m):
    codes, scale = _weight(7, 64, 32)
    assert nf4_mm_triton(torch.randn(0, 64), codes, scale, LEVELS, 32).shape == (0, 7)
    x, bias = torch.randn(m, 64, requires_grad=True), torch.randn(7, requires_grad=True)
    nf4_mm_triton(x, codes, scale, LEVELS, 32, bias).square().sum().backward()
    grads = x.grad, bias.grad
    x.grad = bias.grad = None
    nf4_mm_reference(x, codes, scale, LEVELS, 32, bias).square().sum().backward()
    torch.testing.assert_close(grads, (x.grad, bias.grad), atol=1e-5, rtol=1e-5)


def test_grad_input_matches_float64():
    codes, scale = _weight(7, 64, 32)
    g = torch.randn(2, 3, 7)
    w64 = _float64_linear(torch.eye(64), codes, scale, 32).T  # [N, K]
    torch.testing.assert_close(nf4_mm_grad_input(g, codes, scale, LEVELS, 32).double(), g.double() @ w64)


# ---- dispatch, wiring and errors ---------------------------------------------------------------
# ---- the prefill path: dequantize once, then the dense matmul -----------------------------------
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_dequantize_triton_matches_reference(block_size, dtype):
    codes, scale = _weight(40, 256, block_size)  # N off the 32-row tile
    w = nf4_dequantize_triton(codes, scale, LEVELS, block_size, dtype)
    ref = nf4_mm_module._dequantize(codes, scale, LEVELS, block_size)  # fp32
    assert w.shape == (40, 256) and w.dtype == dtype
    if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest)
        torch.testing.assert_close(w.float(), ref.to(dtype).float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(w, ref.to(dtype))
    assert torch.equal(nf4_dequantize(codes, scale, LEVELS, block_size, dtype), ref.to(dtype))  # CPU: torch ops


@pytest.mark.parametrize("block_size", [8, 48, 512])
def test_dequantize_triton_rejects_blocks_the_kernel_cannot_take(block_size):
    codes, scale = _weight(8, 96 if block_size == 48 else 256, block_size if block_size != 512 else 256)
    with pytest.raises(ValueError, match=f"block_size={block_size} must be a power of two >= 16 dividing K"):
        nf4_dequantize_triton(codes, scale, LEVELS, block_size, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dense_matches_reference_with_gradients(dtype):
    codes, scale = _weight(24, 128, 64)
    x, bias = torch.randn(2, 20, 128).to(dtype).requires_grad_(), torch.randn(24).to(dtype).requires_grad_()
    y = nf4_mm_dense(x, codes, scale, LEVELS, 64, bias)
    assert y.shape == (2, 20, 24) and y.dtype == dtype
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias), g)
    y_ref = nf4_mm_reference(x, codes, scale, LEVELS, 64, bias)
    grads_ref = torch.autograd.grad(y_ref, (x, bias), g)
    assert_matches_reference((y, *grads), (y_ref, *grads_ref), dtype)


def test_dense_compiles_fullgraph_as_one_opaque_op():
    codes, scale = _weight(24, 128, 64)
    x = torch.randn(20, 128)
    compiled = torch.compile(nf4_mm_dense, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, codes, scale, LEVELS, 64), nf4_mm_dense(x, codes, scale, LEVELS, 64))


@pytest.mark.parametrize("m, path", [(1, "triton"), (16, "triton"), (17, "dense"), (4096, "dense")])
def test_dispatch_on_cuda_takes_the_gemv_then_the_dense_path(monkeypatch, m, path):
    taken = []
    monkeypatch.setattr(nf4_mm_module, "use_triton", lambda t: True)
    for name in ("nf4_mm_triton", "nf4_mm_dense"):
        monkeypatch.setattr(nf4_mm_module, name, lambda *a, name=name: taken.append(name.split("_")[-1]))
    codes, scale = _weight(8, 64, 32)
    nf4_mm(torch.randn(m, 64), codes, scale, LEVELS, 32)
    assert taken == [path]


def test_dispatch_uses_reference_on_cpu():
    codes, scale = _weight(7, 64, 32)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(nf4_mm(x, codes, scale, LEVELS, 32), nf4_mm_reference(x, codes, scale, LEVELS, 32))


def test_level_table_is_made_once_per_device():
    assert _level_table(torch.device("cpu")) is _level_table("cpu")
    assert torch.equal(_level_table("cpu"), LEVELS) and _level_table("cpu").dtype == torch.float32


_C, _S = torch.zeros(7, 32, dtype=torch.uint8), torch.ones(14)  # N=7, K=64, block_size 32
BAD_INPUTS = [
    pytest.param({"x": torch.randn(5, 64).int()}, TypeError, "x.dtype=torch.int32", id="x-int"),
    pytest.param({"codes": _C.to(torch.int8)}, TypeError, "codes.dtype=torch.int8, expected torch.uint8", id="codes-int8"),
    pytest.param({"codes": _C.float()}, TypeError, "codes.dtype=torch.float32", id="codes-float"),
    pytest.param({"scale": _S.int()}, TypeError, "scale.dtype=torch.int32", id="scale-int"),
    pytest.param({"levels": LEVELS.int()}, TypeError, "levels.dtype=torch.int32", id="levels-int"),
    pytest.param({"codes": _C[0]}, ValueError, "codes must be 2-D", id="codes-1d"),
    pytest.param({"codes": _C[:, :31]}, ValueError, r"codes.shape=\(7, 31\) does not hold K=64", id="codes-short"),
    pytest.param({"x": torch.randn(5, 63)}, ValueError, r"does not hold K=63 .* K even", id="odd-K"),
    pytest.param({"block_size": 0}, ValueError, "block_size=0 must be a positive int", id="block-0"),
    pytest.param({"block_size": 3}, ValueError, r"block_size=3 must divide N\*K=7\*64=448", id="block-not-dividing"),
    pytest.param({"scale": torch.ones(7, 2)}, ValueError, r"scale.shape=\(7, 2\), expected \(14,\)", id="scale-2d"),
    pytest.param({"levels": LEVELS[:8]}, ValueError, r"levels.shape=\(8,\), expected \(16,\)", id="levels-8"),
    pytest.param({"bias": torch.zeros(8)}, ValueError, r"bias.shape=\(8,\), expected \(7,\)", id="bias-shape"),
    pytest.param({"bias": torch.zeros(7).int()}, TypeError, "bias.dtype=torch.int32", id="bias-int"),
    pytest.param({"scale": torch.ones(14, device="meta")}, ValueError, "must share a device", id="device"),
]  # fmt: skip


@pytest.mark.parametrize(
    "impl", [nf4_mm_reference, nf4_mm_triton, nf4_mm_dense], ids=["reference", "triton", "dense"]
)
@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS)
def test_bad_input_raises(impl, kwargs, exc, match):
    args = {"x": torch.randn(5, 64), "codes": _C, "scale": _S, "levels": LEVELS, "block_size": 32, "bias": None}
    with pytest.raises(exc, match=match):
        impl(**(args | kwargs))


KERNEL_ONLY = [
    pytest.param({"scale": torch.ones(56), "block_size": 8}, ValueError, "block_size=8 must be a power of two >= 16", id="block-8"),
    pytest.param({"x": torch.randn(5, 64), "codes": torch.zeros(8, 32, dtype=torch.uint8), "scale": torch.ones(4),
                  "block_size": 128}, ValueError, "block_size=128 must divide K=64", id="block-spans-rows"),
    pytest.param({"x": torch.randn(5, 64).double()}, TypeError, "x.dtype=torch.float64", id="x-fp64"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, exc, match", KERNEL_ONLY)
def test_triton_rejects_what_only_the_reference_takes(kwargs, exc, match):
    args = {"x": torch.randn(5, 64), "codes": _C, "scale": _S, "levels": LEVELS, "block_size": 32} | kwargs
    with pytest.raises(exc, match=match):
        nf4_mm_triton(**args)
    nf4_mm_reference(**args)  # valid there
    nf4_mm(**args)  # and the dispatcher falls back to it


def test_grad_input_rejects_a_gradient_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"grad.shape=\(5, 6\) must end in N=7"):
        nf4_mm_grad_input(torch.randn(5, 6), _C, _S, LEVELS, 32)


# ---- GPU: real sizes (CPU siblings above) ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 100, 2048], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_matches_reference_on_cuda(m, dtype):
    n, k = 4096, 4096
    q = NF4Tensor.from_float(torch.randn(n, k, device="cuda", dtype=dtype) * 0.02)
    x, bias = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    args = (q.codes, q.block_scales(), _level_table(q.device), q.block_size)
    y = nf4_mm(x, *args, bias)
    # 16-bit output (one ulp) plus, for GEMM, W rounded to x's dtype; atol for outputs near 0.
    y_ref = nf4_mm_reference(x, *args, bias)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    # The NF4Tensor handler takes the kernel: the same launch from 2 rows on; one row takes the GEMV that
    # computes the double-quant scales itself, autotuned on its own (another tile may sum in another order)
    exact = {} if m == 1 else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(F.linear(x, q, bias), y, **exact)
    torch._dynamo.reset()  # each parametrization is a new graph: stay under the recompile limit
    compiled = torch.compile(lambda x, w, b: F.linear(x, w, b), fullgraph=True)
    # not bit-exact: inductor autotunes the kernel again (another tile: 1-ulp differences on the H100)
    assert_close_at_scale(compiled(x, q, bias), y_ref)
    xg = x.detach().requires_grad_()
    F.linear(xg, q, bias).sum().backward()
    grad_ref = torch.ones(m, n, device="cuda").double() @ q.dequantize(torch.float64)
    torch.testing.assert_close(xg.grad.double(), grad_ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_words_row_matches_reference_on_cuda():
    # the one-row words path launched alone on a real GPU (the autotuner runs only the fastest):
    # the PTX prmt lookup must give the fp16 levels exactly
    import triton

    torch.manual_seed(0)
    n, k, block_size = 1000, 4096, 64
    q = NF4Tensor.from_float(torch.randn(n, k, device="cuda") * 0.02, block_size=block_size)
    scale2 = q.block_scales().reshape(n, k // block_size)
    x = torch.randn(1, k, device="cuda")
    y = torch.empty(1, n, device="cuda")
    nf4_mm_module._nf4_gemv_kernel.fn[(triton.cdiv(n, 16),)](
        x, q.codes, scale2, _level_table(q.device), scale2, y, 1, n, k, *x.stride(), *q.codes.stride(),
        *scale2.stride(), *y.stride(),
        BLOCK_SIZE=block_size, HAS_BIAS=False, WORDS_OK=True, BLOCK_M=1, BLOCK_N=16, BLOCK_K=1024, WORDS=True,
        **nf4_mm_module._plain_scale_args(scale2),
    )  # fmt: skip
    levels = _level_table(q.device).half().float()
    y_ref = nf4_mm_reference(x, q.codes, q.block_scales(), levels, block_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)


# ---- one row of codes read as int32 words, levels by prmt (_nf4_words_row) ---------------------------
@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("block_n, block_k", [(16, 64), (8, 256), (16, 512)])
def test_words_row_matches_reference_across_blocks(block_size, block_n, block_k):
    # On a GPU the autotuner times these tiles (K tiles of several scale blocks) against the byte
    # tiles; the interpreter's list has one byte tile, so the words path is launched here by hand.
    import triton

    torch.manual_seed(0)
    n, k = 20, 512
    codes, scale = _weight(n, k, block_size)
    scale2 = scale.reshape(n, k // block_size)
    x = torch.randn(1, k)
    y = torch.empty(1, n)
    nf4_mm_module._nf4_gemv_kernel.fn[(triton.cdiv(n, block_n),)](
        x, codes, scale2, LEVELS, scale2, y, 1, n, k, *x.stride(), *codes.stride(), *scale2.stride(), *y.stride(),
        BLOCK_SIZE=block_size, HAS_BIAS=False, WORDS_OK=True, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k,
        WORDS=True, **nf4_mm_module._plain_scale_args(scale2),
    )  # fmt: skip
    # prmt: the levels as fp16, each within 2**-12 of itself: the sum within ~2**-12 of its magnitude
    levels = LEVELS.half().float()
    torch.testing.assert_close(y, nf4_mm_reference(x, codes, scale, levels, block_size), rtol=1e-5, atol=1e-4)


def test_words_tiles_are_offered_only_for_one_aligned_row():
    import triton

    cfg = lambda n, k, words: triton.Config({"BLOCK_N": n, "BLOCK_K": k, "WORDS": words}, num_warps=4)  # noqa: E731
    configs = [cfg(16, 64, False), cfg(16, 1024, True)]
    prune = nf4_mm_module._prune_gemv
    kept = lambda **kw: [(c.kwargs["BLOCK_K"], c.kwargs["WORDS"]) for c in prune(configs, {}, **kw)]  # noqa: E731
    assert kept(BLOCK_SIZE=64, BLOCK_M=1, WORDS_OK=True) == [(64, False), (1024, True)]
    assert kept(BLOCK_SIZE=64, BLOCK_M=1, WORDS_OK=False) == [(64, False)]
    assert kept(BLOCK_SIZE=64, BLOCK_M=2, WORDS_OK=True) == [(64, False)]


# ---- 2-16 rows, codes as int32 words: the GEMM's words tiles (_nf4_words_tile) ---------------------
def _launch_words_gemm(x, codes, scale2, block_size, block_n, block_m, block_k):
    import triton

    m, k = x.shape
    n = codes.shape[0]
    y = torch.empty(m, n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    nf4_mm_module._nf4_gemm_kernel.fn[grid](
        x, codes, scale2, LEVELS, scale2, y, m, n, k, *x.stride(), *codes.stride(), *scale2.stride(), *y.stride(),
        BLOCK_SIZE=block_size, HAS_BIAS=False, DOT_FP32=True, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
        WORDS_OK=True, WORDS=True,
    )  # fmt: skip
    return y


@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize("block_size, block_k, k", [(16, 32, 96), (64, 128, 320), (64, 256, 256), (32, 64, 96)])
def test_words_gemm_tile_matches_reference(m, block_size, block_k, k):
    # levels by prmt (fp16), K tiles of several blocks, x read in the words' element order; K not a
    # multiple of the tile (the words and x past K read 0), N a part tile
    torch.manual_seed(m * k)
    n = 20
    codes, scale = _weight(n, k, block_size)
    x = torch.randn(m, k)
    y = _launch_words_gemm(x, codes, scale.reshape(n, k // block_size), block_size, 16, 16, block_k)
    ref = nf4_mm_reference(x, codes, scale, LEVELS.half().float(), block_size)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_gemm_words_tiles_are_offered_for_up_to_16_aligned_rows():
    import triton

    cfg = lambda k, words: triton.Config({"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": k, "WORDS": words})  # noqa: E731
    configs = [cfg(64, False), cfg(128, True), cfg(256, True)]
    prune = nf4_mm_module._prune_gemm
    kept = lambda m, **kw: [(c.kwargs["BLOCK_K"], c.kwargs["WORDS"]) for c in prune(configs, {"M": m}, **kw)]  # noqa: E731
    flags = {"DOT_FP32": False}
    assert kept(16, BLOCK_SIZE=64, WORDS_OK=True, **flags) == [(64, False), (128, True), (256, True)]
    assert kept(16, BLOCK_SIZE=256, WORDS_OK=True, **flags) == [(64, False), (256, True)]  # whole blocks a tile
    assert kept(17, BLOCK_SIZE=64, WORDS_OK=True, **flags) == [(64, False)]
    assert kept(16, BLOCK_SIZE=64, WORDS_OK=False, **flags) == [(64, False)]


def test_every_gpu_gemm_words_config_matches_the_reference(monkeypatch):
    # every words config of the GPU list (the autotuner keeps the fastest, so each must be right)
    monkeypatch.setattr(nf4_mm_module.wmm, "interpreted", lambda: False)
    configs = [c for c in nf4_mm_module._gemm_configs() if c.kwargs.get("WORDS")]
    monkeypatch.undo()
    assert configs
    torch.manual_seed(1)
    n, k, m = 20, 512, 3
    codes, scale = _weight(n, k, 64)
    x = torch.randn(m, k)
    ref = nf4_mm_reference(x, codes, scale, LEVELS.half().float(), 64)
    for c in configs:
        kw = c.kwargs
        y = _launch_words_gemm(x, codes, scale.reshape(n, k // 64), 64, kw["BLOCK_N"], kw["BLOCK_M"], kw["BLOCK_K"])
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4, msg=lambda msg, kw=kw: f"{kw}: {msg}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_gemm_words_config_matches_the_reference_on_cuda(dtype):
    # each words config launched alone on a real GPU in x's 16-bit dtype (the interpreter runs fp32
    # dots), 16 rows of a 4096 x 4096 weight: the joined prmt tile and the permuted x rows
    import triton

    torch.manual_seed(0)
    n, k, m = 4096, 4096, 16
    q = NF4Tensor.from_float(torch.randn(n, k, device="cuda") * 0.02)
    scale2 = q.block_scales().reshape(n, k // q.block_size)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    lv = _level_table(q.device)
    ref = nf4_mm_reference(x, q.codes, q.block_scales(), lv.half().float(), q.block_size).float()
    for c in [c for c in nf4_mm_module._gemm_configs() if c.kwargs.get("WORDS")]:
        kw = c.kwargs
        y = torch.empty(m, n, device="cuda", dtype=dtype)
        grid = (triton.cdiv(n, kw["BLOCK_N"]), triton.cdiv(m, kw["BLOCK_M"]))
        nf4_mm_module._nf4_gemm_kernel.fn[grid](
            x, q.codes, scale2, lv, scale2, y, m, n, k, *x.stride(), *q.codes.stride(), *scale2.stride(),
            *y.stride(), BLOCK_SIZE=q.block_size, HAS_BIAS=False, DOT_FP32=False, WORDS_OK=True,
            num_warps=c.num_warps, num_stages=c.num_stages, **kw,
        )  # fmt: skip
        # W rounded to x's dtype before the dot: within a 16-bit rounding of the fp32 reference
        assert_close_at_scale(y.float(), ref, rel=1e-2, min_sqnr=40)


def test_every_gpu_gemv_config_for_one_row_matches_the_reference(monkeypatch):
    # The autotuner keeps whichever offered config is fastest, so each must be right: every config of
    # the GPU list that the prune keeps for one aligned row (the prmt words tiles included), launched by hand
    import triton

    monkeypatch.setattr(nf4_mm_module.wmm, "interpreted", lambda: False)
    configs = nf4_mm_module._gemv_configs()
    monkeypatch.undo()
    kept = nf4_mm_module._prune_gemv(configs, {}, BLOCK_SIZE=64, BLOCK_M=1, WORDS_OK=True)
    assert {c.kwargs["WORDS"] for c in kept} == {False, True}
    torch.manual_seed(0)
    n, k = 20, 2048
    codes, scale = _weight(n, k, 64)
    scale2, x = scale.reshape(n, k // 64), torch.randn(1, k)
    for c in kept:
        y = torch.empty(1, n)
        nf4_mm_module._nf4_gemv_kernel.fn[(triton.cdiv(n, c.kwargs["BLOCK_N"]),)](
            x, codes, scale2, LEVELS, scale2, y, 1, n, k, *x.stride(), *codes.stride(), *scale2.stride(), *y.stride(),
            BLOCK_SIZE=64, HAS_BIAS=False, WORDS_OK=True, BLOCK_M=1, **c.kwargs,
            **nf4_mm_module._plain_scale_args(scale2),
        )  # fmt: skip
        levels = LEVELS.half().float() if c.kwargs["WORDS"] else LEVELS
        ref = nf4_mm_reference(x, codes, scale, levels, 64)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4, msg=lambda m, c=c: f"{c.kwargs}: {m}")
