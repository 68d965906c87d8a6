"""quantframe.kernels.affine_mm: reference vs float64 dequantize-then-matmul; Triton vs reference.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py).
"""

import pytest
import quantframe.kernels.affine_mm as affine_mm_module
import torch
import triton
from quantframe.kernels.affine_mm import (
    affine_dequantize,
    affine_dequantize_triton,
    affine_mm,
    affine_mm_dense,
    affine_mm_reference,
    affine_mm_triton,
)

from quantframe import primitives as P
from quantframe.testing import assert_close_at_scale, assert_matches_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol) of Triton vs reference: both accumulate in fp32 in another order (and the GEMM
# rounds a grouped W to x's 16-bit dtype on a GPU), which can flip the final rounding by one ulp.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
GROUPS = {"row": None, "g32": 32, "g64": 64}


def _weight(n, k, bits, group_size, symmetric):
    """(qdata, scale, zero_point) of a random codes grid in the AffineQuantizedTensor layout."""
    g = 1 if group_size is None else k // group_size
    scale = torch.rand(n, g) * 0.02 + 0.001
    if bits == 8 and symmetric:
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        return codes, scale, torch.zeros(n, g, dtype=torch.int32)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    zero_point = (
        torch.full((n, g), 2 ** (bits - 1), dtype=torch.int32)
        if symmetric
        else torch.randint(0, 2**bits, (n, g), dtype=torch.int32)
    )
    return (codes if bits == 8 else P.pack_bits(codes, bits)), scale, zero_point


def _float64_linear(x, qdata, scale, zero_point, bits, k, bias):
    """The obvious computation, element by element in float64: W[n, k] = (code - zp[n, g]) * scale[n, g]."""
    codes = qdata if bits == 8 else P.unpack_bits(qdata, bits)
    group = k // scale.shape[1]
    w = torch.empty(codes.shape, dtype=torch.float64)
    for j in range(k):
        w[:, j] = (codes[:, j].double() - zero_point[:, j // group].double()) * scale[:, j // group].double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


# ---- reference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group", GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_reference_matches_float64_dequantize_then_matmul(bits, group, symmetric):
    qdata, scale, zero_point = _weight(7, 64, bits, group, symmetric)
    x, bias = torch.randn(2, 5, 64), torch.randn(7)
    y = affine_mm_reference(x, qdata, scale, zero_point, bits, group, bias)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 7)
    torch.testing.assert_close(
        y.double(), _float64_linear(x, qdata, scale, zero_point, bits, 64, bias), atol=1e-5, rtol=1e-5
    )


def test_hand_worked_int4_values():
    # codes row 0 = [1, 2 | 3, 4] (low nibble first), group_size 2: W = [(1-1)*0.5, (2-1)*0.5, (3-2)*2, (4-2)*2]
    qdata = torch.tensor([[1 | 2 << 4, 3 | 4 << 4]], dtype=torch.uint8)
    scale, zero_point = torch.tensor([[0.5, 2.0]]), torch.tensor([[1, 2]], dtype=torch.int32)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # W = [0, 0.5, 2, 4]: x @ W.T = 0 + 1 + 6 + 16 = 23
    assert affine_mm_reference(x, qdata, scale, zero_point, 4, 2).tolist() == [[23.0]]


# ---- Triton vs reference -----------------------------------------------------------------------
def _cases():
    for bits in (8, 4, 3, 2):
        for sym in ("sym", "asym"):
            for gname, group in GROUPS.items():
                for m in (1, 5, 16, 33):  # GEMV up to 16 rows, GEMM above
                    for dname, dtype in DTYPES.items():
                        has_bias = (m + bits) % 2 == 1  # half the cases, alternating over M
                        ids = f"int{bits}-{sym}-{gname}-M{m}-{dname}{'-bias' if has_bias else ''}"
                        yield pytest.param(bits, sym == "sym", group, m, dtype, has_bias, id=ids)


@pytest.mark.parametrize("bits, symmetric, group, m, dtype, has_bias", list(_cases()))
def test_triton_matches_reference(bits, symmetric, group, m, dtype, has_bias):
    n, k = 24, 128 if group else (66 if bits in (8, 4) else 72)  # per row: K off the BLOCK_K multiple
    qdata, scale, zero_point = _weight(n, k, bits, group, symmetric)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if has_bias else None
    y = affine_mm_triton(x, qdata, scale, zero_point, bits, group, bias)
    y_ref = affine_mm_reference(x, qdata, scale, zero_point, bits, group, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("m", [3, 20], ids=["gemv", "gemm"])
def test_triton_takes_3d_and_strided_input(m):
    qdata, scale, zero_point = _weight(9, 64, 4, 32, False)
    x = torch.randn(2, m, 128)[..., ::2]  # every other column: the kernels read x through strides
    y = affine_mm_triton(x, qdata, scale, zero_point, 4, 32)
    assert y.shape == (2, m, 9)
    torch.testing.assert_close(y, affine_mm_reference(x, qdata, scale, zero_point, 4, 32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_triton_takes_empty_batch_and_gradients_reach_x_and_bias(bits):
    qdata, scale, zero_point = _weight(7, 64, bits, 32, False)
    assert affine_mm_triton(torch.randn(0, 64), qdata, scale, zero_point, bits, 32).shape == (0, 7)
    x, bias = torch.randn(3, 64, requires_grad=True), torch.randn(7, requires_grad=True)
    affine_mm_triton(x, qdata, scale, zero_point, bits, 32, bias).square().sum().backward()
    grads = x.grad, bias.grad
    x.grad = bias.grad = None
    affine_mm_reference(x, qdata, scale, zero_point, bits, 32, bias).square().sum().backward()
    torch.testing.assert_close(grads, (x.grad, bias.grad), atol=1e-5, rtol=1e-5)


# ---- the prefill path: dequantize once, then the dense matmul -----------------------------------
def _assert_same_rounding(w, ref_fp32, dtype):
    """Bit for bit; bf16 within one ulp: the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest)."""
    if dtype == torch.bfloat16:
        torch.testing.assert_close(w.float(), ref_fp32.to(dtype).float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(w, ref_fp32.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits, symmetric, group", [(8, True, None), (8, False, 32), (4, False, 64), (4, True, None),
                                                    (4, True, 16), (3, False, 32), (3, True, None), (2, False, 64),
                                                    (2, True, None)])  # fmt: skip
def test_dequantize_triton_matches_reference(bits, symmetric, group, dtype):
    n, k = 40, 256  # N off the 32-row tile
    qdata, scale, zero_point = _weight(n, k, bits, group, symmetric)
    w = affine_dequantize_triton(qdata, scale, zero_point, bits, group, dtype)
    assert w.shape == (n, k) and w.dtype == dtype
    ref = affine_mm_module._dequantize(qdata, scale, zero_point, bits)  # fp32
    _assert_same_rounding(w, ref, dtype)
    assert torch.equal(affine_dequantize(qdata, scale, zero_point, bits, group, dtype), ref.to(dtype))  # CPU: ops


@pytest.mark.parametrize(
    "bits, group, match", [(3, 24, "group_size=24"), (4, 8, "group_size=8"), (8, 48, "group_size=48")]
)
def test_dequantize_triton_rejects_what_the_kernel_cannot_take(bits, group, match):
    qdata, scale, zero_point = _weight(4, 96 if group in (24, 48) else 64, bits, group, False)
    with pytest.raises(ValueError, match=match):
        affine_dequantize_triton(qdata, scale, zero_point, bits, group, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_dense_matches_reference_with_gradients(bits, dtype):
    qdata, scale, zero_point = _weight(24, 128, bits, 32, False)
    x, bias = torch.randn(2, 20, 128).to(dtype).requires_grad_(), torch.randn(24).to(dtype).requires_grad_()
    y = affine_mm_dense(x, qdata, scale, zero_point, bits, 32, bias)
    assert y.shape == (2, 20, 24) and y.dtype == dtype
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias), g)
    y_ref = affine_mm_reference(x, qdata, scale, zero_point, bits, 32, bias)
    grads_ref = torch.autograd.grad(y_ref, (x, bias), g)
    assert_matches_reference((y, *grads), (y_ref, *grads_ref), dtype)


def test_dense_compiles_fullgraph_as_one_opaque_op():
    qdata, scale, zero_point = _weight(24, 128, 4, 32, False)
    x = torch.randn(20, 128)
    compiled = torch.compile(affine_mm_dense, fullgraph=True, backend="aot_eager")
    args = (x, qdata, scale, zero_point, 4, 32)
    assert torch.equal(compiled(*args), affine_mm_dense(*args))


@pytest.mark.parametrize("m, path", [(1, "triton"), (16, "triton"), (17, "dense"), (4096, "dense")])
def test_dispatch_on_cuda_takes_the_gemv_then_the_dense_path(monkeypatch, m, path):
    """Where Triton runs (CUDA), M <= FUSED_MAX_ROWS goes to the fused kernels, M >= DENSE_MIN_ROWS to
    dequantize + dense matmul (the fused GEMM is 10x slower there on an H100: docs/results.md)."""
    taken = []
    monkeypatch.setattr(affine_mm_module, "use_triton", lambda t: True)
    for name in ("affine_mm_triton", "affine_mm_dense"):
        monkeypatch.setattr(affine_mm_module, name, lambda *a, name=name: taken.append(name.split("_")[-1]))
    qdata, scale, zero_point = _weight(8, 64, 4, 32, False)
    affine_mm(torch.randn(m, 64), qdata, scale, zero_point, 4, 32)
    assert taken == [path]


# ---- dispatch and errors -----------------------------------------------------------------------
def test_dispatch_uses_reference_on_cpu():
    qdata, scale, zero_point = _weight(7, 64, 4, 32, False)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(
        affine_mm(x, qdata, scale, zero_point, 4, 32), affine_mm_reference(x, qdata, scale, zero_point, 4, 32)
    )


_Q4, _S, _Z = torch.zeros(7, 32, dtype=torch.uint8), torch.ones(7, 2), torch.zeros(7, 2, dtype=torch.int32)  # K=64, g32
BAD_INPUTS = [
    pytest.param({"bits": 5}, ValueError, "bits=5 is not supported", id="bits-5"),
    pytest.param({"x": torch.randn(5, 64).int()}, TypeError, "x.dtype=torch.int32", id="x-int"),
    pytest.param(
        {"qdata": _Q4.to(torch.int8)},
        TypeError,
        "qdata.dtype=torch.int8, expected torch.uint8",
        id="qdata-int8-for-int4",
    ),
    pytest.param({"qdata": _Q4.float()}, TypeError, "qdata.dtype=torch.float32", id="qdata-float"),
    pytest.param({"scale": _S.int()}, TypeError, "scale.dtype=torch.int32", id="scale-int"),
    pytest.param({"zero_point": _Z.float()}, TypeError, "zero_point.dtype=torch.float32", id="zero_point-float"),
    pytest.param({"qdata": _Q4[0]}, ValueError, r"qdata must be 2-D", id="qdata-1d"),
    pytest.param({"qdata": _Q4[:, :31]}, ValueError, r"qdata.shape=\(7, 31\) does not hold K=64", id="qdata-short"),
    pytest.param({"x": torch.randn(5, 63)}, ValueError, r"4-bit packing needs K=63 .* multiple of 2", id="odd-K-int4"),
    pytest.param({"group_size": 48}, ValueError, "group_size=48 must divide K=64", id="group-not-dividing"),
    pytest.param({"group_size": 0}, ValueError, "group_size=0 must be None", id="group-0"),
    pytest.param({"scale": torch.ones(7, 1)}, ValueError, r"scale.shape=\(7, 1\), expected \(7, 2\)", id="scale-shape"),
    pytest.param({"zero_point": _Z[:6]}, ValueError, r"zero_point.shape=\(6, 2\), expected \(7, 2\)", id="zp-shape"),
    pytest.param({"bias": torch.zeros(8)}, ValueError, r"bias.shape=\(8,\), expected \(7,\)", id="bias-shape"),
    pytest.param({"bias": torch.zeros(7).int()}, TypeError, "bias.dtype=torch.int32", id="bias-int"),
    pytest.param({"scale": torch.ones(7, 2, device="meta")}, ValueError, "must share a device", id="device"),
]


def _valid_args() -> dict:
    """A valid call of every affine_mm variant (x [5, 64], int4 g32 weight [7, 64]) to spoil one argument of."""
    return {"x": torch.randn(5, 64), "qdata": _Q4, "scale": _S, "zero_point": _Z, "bits": 4, "group_size": 32,
            "bias": None}  # fmt: skip


@pytest.mark.parametrize(
    "impl", [affine_mm_reference, affine_mm_triton, affine_mm_dense], ids=["reference", "triton", "dense"]
)
@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS)
def test_bad_input_raises(impl, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        impl(**(_valid_args() | kwargs))


KERNEL_ONLY = [
    pytest.param({"group_size": 8, "scale": torch.ones(7, 8), "zero_point": torch.zeros(7, 8, dtype=torch.int32)},
                 ValueError, "group_size=8 must be None or a power of two >= 16", id="group-8"),
    pytest.param({"x": torch.randn(5, 64).double()}, TypeError, "x.dtype=torch.float64", id="x-fp64"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, exc, match", KERNEL_ONLY)
def test_triton_rejects_what_only_the_reference_takes(kwargs, exc, match):
    args = _valid_args() | kwargs
    with pytest.raises(exc, match=match):
        affine_mm_triton(**args)
    affine_mm_reference(**args)  # valid there
    affine_mm(**args)  # and the dispatcher falls back to it


# ---- GPU: real sizes (CPU siblings above) ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 100, 2048], ids=lambda m: f"M{m}")
@pytest.mark.parametrize(
    "bits, symmetric, group",
    [(8, True, None), (8, False, 128), (4, False, 128), (4, True, 32), (4, False, None), (3, False, 128),
     (2, True, 64), (4, False, 16), (2, False, 16)],  # fmt: skip
)
def test_triton_matches_reference_on_cuda(bits, symmetric, group, m):
    n, k = 4096, 4096
    qdata, scale, zero_point = (t.cuda() for t in _weight(n, k, bits, group, symmetric))
    x, bias = (
        torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, device="cuda", dtype=torch.bfloat16),
    )
    y = affine_mm(x, qdata, scale, zero_point, bits, group, bias)
    y_ref = affine_mm_reference(x, qdata, scale, zero_point, bits, group, bias)
    # bf16 output plus, for grouped GEMM, W rounded to bf16: measured on an H100 at most 0.3% of
    # max|y| (8-bit asymmetric codes make |y| ~ 100 here, so outputs near 0 miss any rtol).
    assert_close_at_scale(y, y_ref)
    # compiled: every format through the GEMV (1 row) and the skinny GEMM (7 rows); the dense path
    # (the same op for every format) for two of them. Compiling every case (a fresh graph and kernel
    # autotuning each) kept this file's GPU run near 2 minutes on an H200.
    if m in (1, 7) or (m == 2048 and (bits, group) in ((8, None), (4, 128))):
        torch._dynamo.reset()  # each parametrization is a new graph: stay under the recompile limit
        compiled = torch.compile(affine_mm, fullgraph=True)
        # not bit-exact: inductor autotunes the kernel again and may pick another tile (summation order)
        assert_close_at_scale(compiled(x, qdata, scale, zero_point, bits, group, bias), y_ref)


def test_gemv_prune_drops_the_16x16_tile_at_16_rows():
    # BLOCK_N = BLOCK_K = 16 with BLOCK_M = 16 gave wrong sums on the GPU for packed weights; the
    # prune keeps it only where nothing else divides the group (groups of 16).
    from quantframe.kernels import _weight_mm as wmm

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4) for n, k in ((16, 16), (16, 32), (32, 64))]
    prune = wmm.prune_gemv("GROUP_SIZE")
    tiles = lambda kept: [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept]  # noqa: E731
    assert tiles(prune(configs, {}, GROUP_SIZE=128, BLOCK_M=16)) == [(16, 32)]  # (32, 64): too big
    assert tiles(prune(configs, {}, GROUP_SIZE=128, BLOCK_M=8)) == [(16, 16), (16, 32)]
    assert tiles(prune(configs, {}, GROUP_SIZE=16, BLOCK_M=16)) == [(16, 16)]


@pytest.mark.parametrize("m", [9, 16])
def test_groups_of_16_take_8_rows_a_gemv_launch(m, monkeypatch):
    # Groups of 16 force the 16-wide K tile, wrong at BLOCK_M = 16 on the GPU: 9..16 rows run as
    # launches of at most 8 rows, which together equal the reference.
    from quantframe.kernels import _weight_mm as wmm

    blocks = []

    class Recording:  # wrap_triton(kernel)[grid](...), noting each launch's BLOCK_M
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                blocks.append(kwargs["BLOCK_M"])
                return self.kernel[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(wmm, "wrap_triton", Recording)
    monkeypatch.setattr(wmm, "MMA_MIN_ROWS", 17)  # the GEMV up to 16 rows, as it was (default: one row)
    qdata, scale, zero_point = _weight(48, 64, 4, 16, False)
    x = torch.randn(m, 64)
    y = affine_mm_triton(x, qdata, scale, zero_point, 4, 16)
    assert blocks == [8, triton.next_power_of_2(m - 8)]
    torch.testing.assert_close(y, affine_mm_reference(x, qdata, scale, zero_point, 4, 16), rtol=1e-5, atol=1e-4)


# ---- one row of 4-bit codes read as int32 words (_int4_words_row) -------------------------------
@pytest.mark.parametrize("group", [16, 32, 64, None], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("block_n, block_k", [(16, 64), (16, 128), (8, 256)])
def test_int4_words_row_matches_reference_across_groups(group, block_n, block_k):
    # The GPU takes K tiles of up to 1024 codes, several groups each; the interpreter's autotune list
    # has one 16 x 16 tile, so the spanning path (BLOCK_K > group) is launched here by hand.
    torch.manual_seed(0)
    n, k = 24, 256
    qdata, scale, zero_point = _weight(n, k, 4, group, False)
    x = torch.randn(1, k)
    y = torch.empty(1, n)
    args = (x, qdata, scale, zero_point, scale, y, 1, n, k, *x.stride(), *qdata.stride(), *scale.stride(),
            *zero_point.stride(), *y.stride(), affine_mm_module.wmm.MAGIC_BITS)  # fmt: skip
    affine_mm_module._affine_gemv_kernel.fn[(triton.cdiv(n, block_n),)](
        *args, BITS=4, GROUP_SIZE=group or 0, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k,
        WORDS=True,
    )  # fmt: skip
    torch.testing.assert_close(y, affine_mm_reference(x, qdata, scale, zero_point, 4, group), rtol=1e-5, atol=1e-4)


def test_every_gpu_gemv_config_for_one_row_of_int4_words_matches_the_reference(monkeypatch):
    # The autotuner keeps whichever offered config is fastest, so each must be right: every config of the
    # GPU list that the prune keeps for one row of 4-bit words at group 128, launched by hand
    from quantframe.kernels import _weight_mm as wmm

    monkeypatch.setattr(wmm, "interpreted", lambda: False)
    configs = wmm.gemv_configs(affine_mm_module._GEMV_SHAPES, interpreter_block_k=16)
    monkeypatch.undo()
    kept = wmm.prune_gemv("GROUP_SIZE", "WORDS")(configs, {}, GROUP_SIZE=128, BLOCK_M=1, WORDS=True)
    assert {c.kwargs["BLOCK_K"] for c in kept} >= {128, 1024, 4096}
    torch.manual_seed(0)
    n, k = 9, 4096  # a part tile at every BLOCK_N
    qdata, scale, zero_point = _weight(n, k, 4, 128, False)
    x = torch.randn(1, k)
    ref = affine_mm_reference(x, qdata, scale, zero_point, 4, 128)
    for c in kept:
        y = torch.empty(1, n)
        args = (x, qdata, scale, zero_point, scale, y, 1, n, k, *x.stride(), *qdata.stride(), *scale.stride(),
                *zero_point.stride(), *y.stride(), wmm.MAGIC_BITS)  # fmt: skip
        affine_mm_module._affine_gemv_kernel.fn[(triton.cdiv(n, c.kwargs["BLOCK_N"]),)](
            *args, BITS=4, GROUP_SIZE=128, HAS_BIAS=False, BLOCK_M=1, WORDS=True, **c.kwargs
        )
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4, msg=lambda m, c=c: f"{c.kwargs}: {m}")


def test_gemv_prune_lets_only_the_words_path_span_groups():
    from quantframe.kernels import _weight_mm as wmm

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4) for n, k in ((16, 64), (16, 512), (16, 1024))]
    tiles = lambda kept: [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept]  # noqa: E731
    prune = wmm.prune_gemv("GROUP_SIZE", "WORDS")
    assert tiles(prune(configs, {}, GROUP_SIZE=128, BLOCK_M=1, WORDS=False)) == [(16, 64)]
    # words: fp32 tiles of BLOCK_K / 8 per row, so 16 x 1024 fits too
    assert tiles(prune(configs, {}, GROUP_SIZE=128, BLOCK_M=1, WORDS=True)) == [(16, 64), (16, 512), (16, 1024)]
    assert tiles(wmm.prune_gemv("GROUP_SIZE")(configs, {}, GROUP_SIZE=128, BLOCK_M=1)) == [(16, 64)]


def _launched_words(monkeypatch, x, qdata, scale, zero_point, group):
    from quantframe.kernels import _weight_mm as wmm

    seen = []
    real = wmm.wrap_triton

    def wrap(kernel):
        launch = real(kernel)

        class Noting:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    seen.append(kwargs.get("WORDS"))
                    return launch[grid](*args, **kwargs)

                return run

        return Noting()

    monkeypatch.setattr(wmm, "wrap_triton", wrap)
    y = affine_mm_triton(x, qdata, scale, zero_point, 4, group)
    torch.testing.assert_close(y, affine_mm_reference(x, qdata, scale, zero_point, 4, group), rtol=1e-5, atol=1e-4)
    return seen


def test_one_row_of_aligned_4bit_codes_takes_the_words_path(monkeypatch):
    qdata, scale, zero_point = _weight(32, 64, 4, 32, False)
    assert _launched_words(monkeypatch, torch.randn(1, 64), qdata, scale, zero_point, 32) == [True]
    assert _launched_words(monkeypatch, torch.randn(2, 64), qdata, scale, zero_point, 32) == [None]  # the GEMM kernel
    # rows that do not start on a 4-byte boundary: the byte path
    shifted = torch.empty(qdata.numel() + 1, dtype=torch.uint8)[1:].view(qdata.shape).copy_(qdata)
    assert _launched_words(monkeypatch, torch.randn(1, 64), shifted, scale, zero_point, 32) == [False]
    # K not a multiple of 8 (whole words): the byte path
    qdata, scale, zero_point = _weight(32, 36, 4, None, False)
    assert _launched_words(monkeypatch, torch.randn(1, 36), qdata, scale, zero_point, None) == [False]
