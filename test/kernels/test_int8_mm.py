"""quantframe.kernels.int8_mm: the references vs obvious math; the Triton kernels vs the references.

The Triton launchers run under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from quantframe.kernels import int8_mm
from quantframe.kernels.int8_mm import (
    int8_scaled_mm,
    int8_scaled_mm_reference,
    int8_scaled_mm_triton,
    quantize_colwise_int8,
    quantize_colwise_int8_reference,
    quantize_colwise_int8_triton,
    quantize_rowcol_int8,
    quantize_rowcol_int8_reference,
    quantize_rowcol_int8_triton,
)
from quantframe.kernels.int8_rowwise import quantize_rowwise_int8_reference
from quantframe.testing import LaunchSpy

MM_IMPLS = {"reference": int8_scaled_mm_reference, "triton": int8_scaled_mm_triton}
COLWISE_IMPLS = {"reference": quantize_colwise_int8_reference, "triton": quantize_colwise_int8_triton}
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = [(m, n, k) for m in (1, 7, 33) for n in (16, 33) for k in (16, 48)]
SHAPE_IDS = [f"M{m}-N{n}-K{k}" for m, n, k in SHAPES]


def _operands(m, n, k, bias=False):
    """int8 a [M, K], b [N, K] over the full code range; scales like absmax / 127 of unit data."""
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a_scale, b_scale = torch.rand(m) * 0.02 + 0.001, torch.rand(n) * 0.02 + 0.001
    return a, b, a_scale, b_scale, torch.randn(n) if bias else None


# ---- int8_scaled_mm: reference --------------------------------------------------------------------
@pytest.mark.parametrize("impl", MM_IMPLS.values(), ids=MM_IMPLS.keys())
def test_hand_worked_values(impl):
    a = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)  # [M=2, K=2]
    b = torch.tensor([[5, 6], [-7, 0], [1, 1]], dtype=torch.int8)  # [N=3, K=2]
    # a @ b.T = [[1*5 - 2*6, -7, 1 - 2], [15 + 24, -21, 7]] = [[-7, -7, -1], [39, -21, 7]]
    # times a_scale [1, 0.5] per row and b_scale [2, 1, 0.25] per column, plus bias [1, 0, -1]:
    y = impl(a, b, torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.0, 0.25]), torch.tensor([1.0, 0.0, -1.0]),
             out_dtype=torch.float32)  # fmt: skip
    assert y.tolist() == [[-13.0, -7.0, -1.25], [40.0, -10.5, -0.125]]


@pytest.mark.parametrize("k", [16, 48, 1000])
def test_reference_integer_product_is_exact(k):
    # Unit scales and fp32 output: the result is the integer product itself (exact while < 2**24).
    a, b, _, _, _ = _operands(7, 33, k)
    y = int8_scaled_mm_reference(a, b, torch.ones(7), torch.ones(33), out_dtype=torch.float32)
    assert torch.equal(y, (a.long() @ b.long().T).float())


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_reference_matches_float64_dequantized_matmul(bias):
    a, b, a_scale, b_scale, bias_t = _operands(33, 16, 48, bias)
    expected = (a.double() * a_scale.double()[:, None]) @ (b.double() * b_scale.double()[:, None]).T
    if bias:
        expected += bias_t.double()
    y = int8_scaled_mm_reference(a, b, a_scale, b_scale, bias_t, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and y.shape == (33, 16)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(int8_scaled_mm_reference(a, b, a_scale, b_scale, bias_t), expected.bfloat16())


# ---- int8_scaled_mm: Triton vs reference -----------------------------------------------------------
@pytest.mark.parametrize("m, n, k", SHAPES, ids=SHAPE_IDS)
def test_triton_integer_product_is_exact(m, n, k):
    a, b, _, _, _ = _operands(m, n, k)
    y = int8_scaled_mm_triton(a, b, torch.ones(m), torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(y, (a.long() @ b.long().T).float())


@pytest.mark.parametrize("out_dtype", OUT_DTYPES.values(), ids=OUT_DTYPES.keys())
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m, n, k", SHAPES, ids=SHAPE_IDS)
def test_triton_matches_reference(m, n, k, bias, out_dtype):
    a, b, a_scale, b_scale, bias_t = _operands(m, n, k, bias)
    y = int8_scaled_mm_triton(a, b, a_scale, b_scale, bias_t, out_dtype=out_dtype)
    y_ref = int8_scaled_mm_reference(a, b, a_scale, b_scale, bias_t, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    if out_dtype == torch.bfloat16:
        # Same fp32 epilogue; the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest.
        torch.testing.assert_close(y, y_ref, atol=0, rtol=2**-7)
    else:
        assert torch.equal(y, y_ref)  # same ops in the same order: bit-identical


def test_triton_takes_strided_operands():
    a = torch.randint(-127, 128, (7, 96), dtype=torch.int8)[:, ::2]  # [7, 48], K-stride 2
    b = torch.randint(-127, 128, (48, 33), dtype=torch.int8).T  # [33, 48], column-major
    a_scale, b_scale = torch.rand(7), torch.rand(33)
    y = int8_scaled_mm_triton(a, b, a_scale, b_scale, out_dtype=torch.float32)
    assert torch.equal(y, int8_scaled_mm_reference(a, b, a_scale, b_scale, out_dtype=torch.float32))


@pytest.mark.parametrize("impl", MM_IMPLS.values(), ids=MM_IMPLS.keys())
@pytest.mark.parametrize("m, n, k", [(0, 16, 16), (7, 0, 16), (7, 16, 0)], ids=["M0", "N0", "K0"])
def test_empty_dims(impl, m, n, k):
    a, b, a_scale, b_scale, bias = _operands(m, n, k, bias=True)
    y = impl(a, b, a_scale, b_scale, bias, out_dtype=torch.float32)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, bias.expand(m, n))  # K = 0: an empty sum, only the bias


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    def no_triton(*args):
        raise AssertionError("the Triton launcher ran on a CPU tensor")

    monkeypatch.setattr(int8_mm, "int8_scaled_mm_triton", no_triton)
    monkeypatch.setattr(int8_mm, "quantize_colwise_int8_triton", no_triton)
    a, b, a_scale, b_scale, bias = _operands(7, 16, 48, bias=True)
    y_ref = int8_scaled_mm_reference(a, b, a_scale, b_scale, bias)
    assert torch.equal(int8_scaled_mm(a, b, a_scale, b_scale, bias), y_ref)
    t = torch.randn(7, 5)
    assert all(map(torch.equal, quantize_colwise_int8(t), quantize_colwise_int8_reference(t)))


_A, _B = torch.zeros(7, 48, dtype=torch.int8), torch.zeros(16, 48, dtype=torch.int8)
_SA, _SB = torch.ones(7), torch.ones(16)
BAD_MM = [
    pytest.param(dict(a=_A.float()), TypeError, r"a.dtype=torch.float32, expected torch.int8", id="a-float"),
    pytest.param(dict(b=_B.to(torch.uint8)), TypeError, r"b.dtype=torch.uint8, expected torch.int8", id="b-uint8"),
    pytest.param(dict(a=_A[0]), ValueError, r"a must be 2-D, got shape \(48,\)", id="a-1d"),
    pytest.param(dict(b=_B[None]), ValueError, r"b must be 2-D, got shape \(1, 16, 48\)", id="b-3d"),
    pytest.param(dict(b=_B[:, :40]), ValueError, r"a \[M=7, K=48\] and b \[N=16, K=40\] must share K", id="k"),
    pytest.param(dict(a=torch.zeros(1, 133145, dtype=torch.int8), b=torch.zeros(16, 133145, dtype=torch.int8),
                      a_scale=torch.ones(1)), ValueError, "K=133145 exceeds 133144", id="k-overflow"),  # fmt: skip
    pytest.param(dict(a_scale=_SA.bfloat16()), TypeError, r"a_scale.dtype=torch.bfloat16, expected torch.float32",
                 id="a_scale-bf16"),  # fmt: skip
    pytest.param(dict(b_scale=torch.ones(16, 1)), ValueError, r"b_scale.shape=\(16, 1\), expected \(16,\)",
                 id="b_scale-shape"),  # fmt: skip
    pytest.param(dict(a_scale=torch.ones(16)), ValueError, r"a_scale.shape=\(16,\), expected \(7,\)", id="a-rows"),
    pytest.param(dict(bias=torch.zeros(16, dtype=torch.int32)), TypeError, "bias.dtype=torch.int32, expected a float",
                 id="bias-int"),  # fmt: skip
    pytest.param(dict(bias=torch.zeros(7)), ValueError, r"bias.shape=\(7,\), expected \(16,\)", id="bias-shape"),
    pytest.param(dict(out_dtype=torch.int32), TypeError, "out_dtype=torch.int32, expected bfloat16", id="out-int32"),
    pytest.param(dict(b_scale=torch.ones(16, device="meta")), ValueError, r"must share a device, got \['cpu', 'meta'\]",
                 id="device"),  # fmt: skip
]


@pytest.mark.parametrize("impl", MM_IMPLS.values(), ids=MM_IMPLS.keys())
@pytest.mark.parametrize("kwargs, exc, match", BAD_MM)
def test_mm_bad_input_raises(impl, kwargs, exc, match):
    args = dict(a=_A, b=_B, a_scale=_SA, b_scale=_SB, bias=None, out_dtype=torch.bfloat16) | kwargs
    with pytest.raises(exc, match=match):
        impl(**args)


# ---- the GPU build, checked without a GPU ----------------------------------------------------------
# Compiles the kernels ahead of time for sm_90 (H100) with the ptxas that ships in the triton wheel,
# in a subprocess without TRITON_INTERPRET (which makes @triton.jit build interpreter functions).
# Pointers and sizes are marked 16-divisible, as triton's JIT marks aligned tensors and sizes.
_AOT_SCRIPT = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantframe.kernels import int8_mm as m

def build(fn, signature, constexprs, divisible, **options):
    attrs = {(list(signature).index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return dict(wgmma="wgmma" in k.asm["ptx"], pipelined="cp.async" in k.asm["ptx"], shared=k.metadata.shared)

ints = ["M", "N", "K", "stride_am", "stride_bn", "stride_cm"]
sig = dict(a_ptr="*i8", b_ptr="*i8", as_ptr="*fp32", bs_ptr="*fp32", bias_ptr="*fp32", c_ptr="*bf16",
           **{n: "i32" for n in ints[:4]}, stride_ak="constexpr", stride_bn="i32", stride_bk="constexpr",
           stride_cm="i32", stride_cn="constexpr", **{n: "constexpr" for n in ["HAS_BIAS", *m._CONFIGS[0].kwargs]})
out = {"mm": []}
for c in m._CONFIGS:
    consts = dict(c.kwargs, HAS_BIAS=True, stride_ak=1, stride_bk=1, stride_cn=1)
    r = build(m._int8_scaled_mm_kernel.fn, sig, consts, [*list(sig)[:6], *ints], num_warps=c.num_warps,
              num_stages=c.num_stages)
    out["mm"].append(dict(r, block_m=c.kwargs["BLOCK_M"]))
sig = dict(t_ptr="*bf16", amax_ptr="*fp32", R="i32", C="i32", stride_r="i32", stride_c="constexpr",
           BLOCK_R="constexpr", BLOCK_C="constexpr")
consts = dict(stride_c=1, BLOCK_R=64, BLOCK_C=64)
out["absmax"] = build(m._colwise_absmax_kernel, sig, consts, ["t_ptr", "amax_ptr"], num_warps=4)
sig = dict(list(sig.items())[:2] + [("q_ptr", "*i8"), ("s_ptr", "*fp32")] + list(sig.items())[2:])
out["quantize"] = build(m._colwise_quantize_kernel, sig, consts, ["t_ptr", "amax_ptr", "q_ptr", "s_ptr"], num_warps=4)
sig = dict(t_ptr="*bf16", cs_ptr="*fp32", row_ptr="*fp32", col_ptr="*fp32", R="i32", C="i32", stride_r="i32",
           stride_c="constexpr", HAS_COL_SCALE="constexpr", BLOCK_R="constexpr", BLOCK_C="constexpr")
consts = dict(stride_c=1, HAS_COL_SCALE=True, BLOCK_R=64, BLOCK_C=64)
out["rowcol_absmax"] = build(m._rowcol_absmax_kernel, sig, consts, list(sig)[:4], num_warps=4)
sig = dict(list(sig.items())[:4] + [("qr_ptr", "*i8"), ("sr_ptr", "*fp32"), ("qc_ptr", "*i8"), ("sc_ptr", "*fp32")]
           + list(sig.items())[4:])
out["rowcol_quantize"] = build(m._rowcol_quantize_kernel, sig, consts, list(sig)[:8], num_warps=4)
print(json.dumps(out))
"""


def test_gpu_configs_compile_for_h100_with_int8_wgmma_and_pipelining(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.splitlines()[-1])
    assert len(built["mm"]) == len(int8_mm._GPU_CONFIGS)
    for config in built["mm"]:
        # INT8 tensor cores (warpgroup MMA needs 64-row tiles; the 32-row config uses mma.sync),
        # loads software-pipelined, shared memory within the H100's 227 KiB per block
        assert config["wgmma"] == (config["block_m"] >= 64) and config["pipelined"], config
        assert config["shared"] <= 227 * 1024, config
    for kernel in ("absmax", "quantize", "rowcol_absmax", "rowcol_quantize"):
        assert built[kernel]["shared"] >= 0  # compiles for sm_90


# ---- column-wise quantization ----------------------------------------------------------------------
def test_colwise_reference_hand_worked():
    t = torch.tensor([[1.27, 0.0, 0.5], [-0.64, 0.0, -1.984375], [0.3, 0.0, 0.2578125]])  # [R=3, C=3]
    q, scale = quantize_colwise_int8_reference(t)
    # column 0: 1.27 / 127; column 1 is all zero; column 2: 1.984375 / 127 = 1 / 64 exactly
    torch.testing.assert_close(scale, torch.tensor([0.01, 1e-12, 1 / 64]))
    # column 2 * 64 = [32, -127, 16.5]: the tie goes to the even 16
    assert q.tolist() == [[127, -64, 30], [0, 0, 0], [32, -127, 16]]  # transposed: [C, R]
    assert q.is_contiguous()


def test_colwise_reference_is_rowwise_of_the_transpose():
    t = torch.randn(33, 7)
    q, scale = quantize_colwise_int8_reference(t)
    q_row, scale_row = quantize_rowwise_int8_reference(t.T.contiguous())
    assert torch.equal(q, q_row) and torch.equal(scale, scale_row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 5), (7, 33), (33, 16), (70, 65)], ids=lambda s: f"R{s[0]}-C{s[1]}")
def test_colwise_triton_is_bit_exact(shape, dtype):
    t = (torch.randn(shape) * 3).to(dtype)
    t[:, 0] = 0  # an all-zero column
    q, scale = quantize_colwise_int8_triton(t)
    q_ref, scale_ref = quantize_colwise_int8_reference(t)
    assert q.shape == (shape[1], shape[0]) and q.is_contiguous() and q.dtype == torch.int8
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)


def test_colwise_triton_takes_strided_input():
    t = torch.randn(40, 30)[:, ::2]
    assert all(map(torch.equal, quantize_colwise_int8_triton(t), quantize_colwise_int8_reference(t)))
    t = torch.randn(30, 40).T  # column-major [40, 30]
    assert all(map(torch.equal, quantize_colwise_int8_triton(t), quantize_colwise_int8_reference(t)))


@pytest.mark.parametrize("impl", COLWISE_IMPLS.values(), ids=COLWISE_IMPLS.keys())
def test_colwise_zero_columns(impl):
    q, scale = impl(torch.randn(5, 0))
    assert q.shape == (0, 5) and scale.shape == (0,)


@pytest.mark.parametrize("impl", COLWISE_IMPLS.values(), ids=COLWISE_IMPLS.keys())
@pytest.mark.parametrize(
    "t, exc, match",
    [
        (torch.randn(5), ValueError, r"must be 2-D \[R, C\] with R >= 1, got shape \(5,\)"),
        (torch.randn(0, 5), ValueError, r"with R >= 1, got shape \(0, 5\)"),
        (torch.ones(3, 4, dtype=torch.int32), TypeError, "t.dtype=torch.int32, expected float32"),
        (torch.ones(3, 4, dtype=torch.float64), TypeError, "t.dtype=torch.float64, expected float32"),
    ],
    ids=["1d", "no-rows", "int", "fp64"],
)
def test_colwise_bad_input_raises(impl, t, exc, match):
    with pytest.raises(exc, match=match):
        impl(t)


# ---- per-row and per-column codes of one tensor (quantize_rowcol_int8) ------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 5), (7, 33), (64, 64), (70, 130)], ids=lambda s: f"R{s[0]}-C{s[1]}")
@pytest.mark.parametrize("with_col_scale", [False, True], ids=["", "col-scale"])
def test_rowcol_triton_is_bit_exact(shape, dtype, with_col_scale):
    t = (torch.randn(shape) * 3).to(dtype)
    t[:, 0] = 0  # an all-zero column
    if shape[0] > 1:
        t[1] = 0  # an all-zero row
    col_scale = torch.rand(shape[1]) + 0.5 if with_col_scale else None
    got, ref = quantize_rowcol_int8_triton(t, col_scale), quantize_rowcol_int8_reference(t, col_scale)
    assert [x.shape for x in got] == [shape, (shape[0],), (shape[1], shape[0]), (shape[1],)]
    assert got[2].is_contiguous() and got[0].dtype == got[2].dtype == torch.int8
    assert all(map(torch.equal, got, ref))
    assert all(map(torch.equal, quantize_rowcol_int8(t, col_scale), ref))  # CPU: the reference


def test_rowcol_reference_is_the_two_quantizers():
    t, cs = torch.randn(9, 13), torch.rand(13) + 0.5
    q_row, s_row, q_col, s_col = quantize_rowcol_int8_reference(t, cs)
    assert all(map(torch.equal, (q_row, s_row), quantize_rowwise_int8_reference(t, col_scale=cs)))
    assert all(map(torch.equal, (q_col, s_col), quantize_colwise_int8_reference(t)))


def test_rowcol_triton_takes_strided_input():
    t = torch.randn(30, 40).T  # column-major [40, 30]
    assert all(map(torch.equal, quantize_rowcol_int8_triton(t), quantize_rowcol_int8_reference(t)))


ROWCOL_IMPLS = {"reference": quantize_rowcol_int8_reference, "triton": quantize_rowcol_int8_triton}


@pytest.mark.parametrize("impl", ROWCOL_IMPLS.values(), ids=ROWCOL_IMPLS.keys())
@pytest.mark.parametrize(
    "t, col_scale, exc, match",
    [
        (torch.randn(5), None, ValueError, r"must be 2-D \[R, C\] with R >= 1, got shape \(5,\)"),
        (torch.randn(3, 0), None, ValueError, r"w must be 2-D \[N, K\] with K >= 1, got shape \(3, 0\)"),
        (torch.ones(3, 4, dtype=torch.float64), None, TypeError, "t.dtype=torch.float64, expected float32"),
        (torch.ones(3, 4), torch.ones(5), ValueError, r"col_scale must be float32 \[4\]"),
    ],
    ids=["1d", "no-columns", "fp64", "col-scale"],
)
def test_rowcol_bad_input_raises(impl, t, col_scale, exc, match):
    with pytest.raises(exc, match=match):
        impl(t, col_scale)


# ---- one row: the dp4a GEMV (GEMV_ONE_ROW) ------------------------------------------------------
@pytest.mark.parametrize(
    "n, k, has_bias, out_dtype",
    [(37, 1024, False, torch.bfloat16), (40, 300, True, torch.float32), (5, 4, True, torch.float16)],
    ids=["N37-K1024-bf16", "N40-K300-bias-fp32", "N5-K4-bias-fp16"],
)
def test_one_row_gemv_equals_the_gemm(monkeypatch, n, k, has_bias, out_dtype):
    a, b = torch.randint(-127, 128, (1, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a_scale, b_scale = torch.rand(1) + 0.1, torch.rand(n) + 0.1
    bias = torch.randn(n) if has_bias else None
    monkeypatch.setattr(int8_mm, "GEMV_ONE_ROW", False)
    gemm = int8_scaled_mm_triton(a, b, a_scale, b_scale, bias, out_dtype)
    monkeypatch.setattr(int8_mm, "GEMV_ONE_ROW", True)
    launched = []
    monkeypatch.setattr(int8_mm, "_int8_scaled_mm_kernel", LaunchSpy(int8_mm._int8_scaled_mm_kernel, launched))
    gemv = int8_scaled_mm_triton(a, b, a_scale, b_scale, bias, out_dtype)
    assert not launched  # the GEMV ran, not the GEMM
    assert torch.equal(gemv, gemm)  # exact int32 sums, the same epilogue


def test_one_row_gemv_needs_aligned_word_rows():
    a, b = torch.randint(-127, 128, (1, 6), dtype=torch.int8), torch.randint(-127, 128, (3, 6), dtype=torch.int8)
    y = int8_scaled_mm_triton(a, b, torch.ones(1), torch.ones(3), None, torch.float32)  # K % 4: the GEMM
    assert torch.equal(y, int8_scaled_mm_reference(a, b, torch.ones(1), torch.ones(3), None, torch.float32))


@pytest.mark.gpu
def test_one_row_gemv_equals_the_gemm_on_cuda(monkeypatch):
    # the PTX dp4a on a real GPU: the same int32 sums as the INT8 tensor cores
    a = torch.randint(-127, 128, (1, 4096), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (14336, 4096), dtype=torch.int8, device="cuda")
    a_scale, b_scale = torch.rand(1, device="cuda") + 0.1, torch.rand(14336, device="cuda") + 0.1
    monkeypatch.setattr(int8_mm, "GEMV_ONE_ROW", False)
    gemm = int8_scaled_mm_triton(a, b, a_scale, b_scale, None, torch.bfloat16)
    monkeypatch.setattr(int8_mm, "GEMV_ONE_ROW", True)
    assert torch.equal(int8_scaled_mm_triton(a, b, a_scale, b_scale, None, torch.bfloat16), gemm)
