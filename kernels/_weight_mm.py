"""What the quantized-weight matmul families (``affine_mm``, ``nf4_mm``) share.

Both compute ``y [M, N] = x [M, K] @ W.T (+ bias)`` with a GEMV kernel for one row
(``M < MMA_MIN_ROWS``; grid over ``BLOCK_N``) and a GEMM kernel from two rows on (tensor cores; grid over
``BLOCK_N`` x ``BLOCK_M``), a ``[BLOCK_N, BLOCK_M]`` fp32 accumulator and the same kernel argument layout:
``x, <three weight tensors>, bias, y, M, N, K, stride_xm, stride_xk, <weight strides>, stride_ym,
stride_yn``. Only the weight decoding differs; it stays in each family's module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import is_traced

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_MAX_ROWS = 16  # up to this many rows of x, the fused kernels read the packed weight (bandwidth bound)
# From this many rows on, the dispatchers (affine_mm, nf4_mm) dequantize W once and call the dense
# matmul, and ternary_mm unpacks W to int8 once for torch._int_mm: on an H100 the fused GEMM
# kernels took 6.3 ms (int4 g128), 11.1 ms (NF4) and 3.4-3.7 ms (ternary) at M=4096, N=14336,
# K=4096, against 0.63 ms for bf16 (docs/results.md); one dequantizing pass writes 2 bytes a weight.
DENSE_MIN_ROWS = FUSED_MAX_ROWS + 1
# From this many rows on, ``launch`` takes the GEMM kernel (tensor cores, the skinny BLOCK_M = 16 tiles
# below) instead of the GEMV kernel, whose elementwise [BLOCK_N, BLOCK_K, BLOCK_M] products run on the
# CUDA cores. Measured on H200 (x [M, 4096] @ W [14336, 4096].T, CUDA graphs, L2 flushed), GEMV vs
# GEMM in us: int8 M=1 21.8 (GEMM at 2 rows: 32.2), M=16 88 vs 32.9; int4 g128 M=16 172 vs 31.5;
# NF4 M=16 288 vs 169; ternary M=4 130 vs 32.3, M=16 613 vs 31.9.
MMA_MIN_ROWS = 2

# (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages) GEMM tiles that ptxas compiles for sm_90
# without spills in bf16 for both families (larger tiles spill; the skinny ones: 64-250 registers).
# The autotuner picks among them per shape; the first five skinny tiles were timed on H200 (stop 13).
GEMM_SHAPES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    # skinny tiles for a few rows (MMA_MIN_ROWS): weight-bandwidth bound, so long K steps and many programs
    (64, 16, 128, 4, 4), (128, 16, 128, 4, 3), (128, 16, 64, 4, 4), (64, 16, 256, 4, 3), (32, 16, 256, 4, 4),
    (64, 16, 64, 4, 4), (64, 16, 32, 4, 4),  # groups of 64 (NF4's blocks) and 32: BLOCK_K must divide them
    # 16 / 32 weight rows on 1 / 2 warps (mma.sync): 4-8x the programs of the tiles above, which at a
    # few rows are too few to keep enough bytes in flight (H200: a load-only kernel read an int4
    # 14336 x 4096 weight in 10.4 us with 16-row programs, 23 us with 64-row ones); not yet timed
    (16, 16, 128, 1, 4), (32, 16, 128, 2, 4), (16, 16, 256, 1, 4), (32, 16, 256, 2, 4), (16, 16, 64, 1, 4),
    (32, 16, 64, 2, 4),
]  # fmt: skip


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- one row of packed codes read as int32 words (the affine 4-bit, NF4 and ternary GEMVs) ------
MAGIC_BITS = 0x4B000000  # the float 2**23: ``MAGIC_BITS | u`` is ``2**23 + u`` for u < 2**23 (a kernel argument)


def word_rows(codes: Tensor, codes_per_word: int, k: int) -> bool:
    """Whether ``codes`` (uint8 ``[N, bytes]``) rows are whole int32 words holding exactly ``k`` codes:
    contiguous along K, rows and storage offset 4-byte aligned (storages start aligned; ``data_ptr``
    is not available under compile), ``k`` a multiple of the codes in a word."""
    return (
        k % codes_per_word == 0
        and codes.stride(1) == 1
        and codes.stride(0) % 4 == 0
        and codes.storage_offset() % 4 == 0
    )


@triton.jit
def load_words(p_ptr, offs_n, mask_n, w_idx, n_words, stride_bytes):
    """int32 words ``[BLOCK_N, len(w_idx)]`` of the packed rows ``p_ptr + n * stride_bytes`` (rows
    4-byte aligned: :func:`word_rows`); 0 for rows past ``mask_n`` and words past ``n_words``."""
    p32 = p_ptr.to(tl.pointer_type(tl.int32))
    mask = mask_n[:, None] & (w_idx < n_words)[None, :]
    return tl.load(p32 + offs_n[:, None] * (stride_bytes // 4) + w_idx[None, :], mask=mask, other=0)


_DP4A_ASM = tl.constexpr(not interpreted())  # the interpreter runs no inline PTX


@triton.jit
def dp4a(a, b, c):
    """int32 ``c + sum_j a_j * b_j`` over the four signed bytes ``j`` of ``a`` and ``b`` (PTX ``dp4a``:
    four int8 products and their sum in one instruction); the interpreter gets the same sum by shifts."""
    if _DP4A_ASM:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    out = c
    for j in tl.static_range(4):
        out += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)  # sign-extended bytes j
    return out


def words_configs(configs: list, kwargs: dict) -> list:
    """The configs with ``WORDS`` set, where the launch allows them (one row, ``WORDS_OK``), else none."""
    if not (kwargs["WORDS_OK"] and kwargs["BLOCK_M"] == 1):
        return []
    return [c for c in configs if c.kwargs["WORDS"]]


@triton.jit
def halves(v, W: tl.constexpr, C: tl.constexpr):
    """``v [W, C]`` -> (columns 0, 2, 4, ...), (columns 1, 3, 5, ...), each ``[W, C // 2]`` (in registers)."""
    return tl.split(tl.reshape(v, (W, C // 2, 2)))


@triton.jit
def x_column(xb, m: tl.constexpr, W: tl.constexpr):
    """Column ``m`` of ``xb [W, 8]`` as a ``[W]`` vector, by three register splits (no data movement):
    the one-row word GEMVs load ``x[8i .. 8i + 7]`` as one ``[W, 8]`` tile (each thread's eight
    contiguous) and take each code's x from it, instead of eight strided loads (sm_90: fewer shared-
    memory round trips for the layout change)."""
    e1, o1 = halves(xb, W, 8)  # columns 0, 2, 4, 6 / 1, 3, 5, 7
    v1 = o1 if m % 2 else e1
    e2, o2 = halves(v1, W, 4)
    v2 = o2 if (m // 2) % 2 else e2
    e3, o3 = halves(v2, W, 2)
    v3 = o3 if m // 4 else e3
    return tl.reshape(v3, (W,))


# ---- autotune configs --------------------------------------------------------------------------
def gemv_configs(shapes: Sequence[tuple[int, int]], interpreter_block_k: int) -> list[triton.Config]:
    """(BLOCK_N, BLOCK_K) ``shapes`` at 4 warps; the interpreter gets one small config
    (``BLOCK_N`` 16, ``interpreter_block_k``): the autotuner times any list longer than one."""
    if interpreted():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": interpreter_block_k}, num_warps=4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=3) for n, k in shapes]


def gemm_configs(shapes: Sequence[tuple[int, int, int, int, int]], interpreter_block_k: int) -> list[triton.Config]:
    """(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages) ``shapes`` for Hopper; the interpreter
    gets one small config (32 x 32 x ``interpreter_block_k``, as in :func:`gemv_configs`)."""
    if interpreted():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_K": interpreter_block_k}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for n, m, k, w, st in shapes
    ]


def prune_gemv(group_key: str, spans_key: str | None = None) -> Callable:
    """Early prune for a GEMV kernel whose constexpr ``group_key`` is the elements per scale (0: one
    group per row): ``BLOCK_K`` must divide the group (or be a multiple of it when the constexpr
    ``spans_key`` is true: a kernel path that takes several groups per tile); the
    ``[BLOCK_N, BLOCK_K, BLOCK_M]`` product must fit in registers (<= 64 fp32 values a thread at 4
    warps: ptxas on sm_90 spills above)."""

    def prune(configs, named_args, **kwargs):
        group, block_m = kwargs[group_key], kwargs["BLOCK_M"]
        spans = bool(spans_key and kwargs.get(spans_key))
        ok = [
            c for c in configs
            if group == 0 or group % c.kwargs["BLOCK_K"] == 0 or (spans and c.kwargs["BLOCK_K"] % group == 0)
        ]  # fmt: skip
        per = 8 if spans else 1  # the spanning path's fp32 tiles are [BLOCK_N, BLOCK_K / 8] (int32 words)
        fit = [c for c in ok if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * block_m <= 8192 * per]
        # Measured on H200 (triton 3.6): BLOCK_N = BLOCK_K = 16 at BLOCK_M = 16 returns wrong sums
        # for the packed 4/3/2-bit affine weights (their codes are interleaved back into K order);
        # the same tile at BLOCK_M <= 8, and every other tile, agree with the reference.
        safe = [c for c in fit if block_m < 16 or c.kwargs["BLOCK_K"] > 16]
        return safe or fit or ok[:1]

    return prune


def prune_gemm(group_key: str) -> Callable:
    """Early prune for a GEMM kernel (``group_key`` as in :func:`prune_gemv`): ``BLOCK_K`` must
    divide the group; fp32 takes small tiles; skip token tiles far larger than the problem."""

    def prune(configs, named_args, **kwargs):
        group, m = kwargs[group_key], named_args["M"]
        ok = [c for c in configs if group == 0 or group % c.kwargs["BLOCK_K"] == 0]
        if kwargs["DOT_FP32"]:  # fp32 FMA tiles: only the smallest fit in registers
            fp32 = [c for c in ok if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] <= 4096 and c.kwargs["BLOCK_K"] <= 32]
            ok = fp32 or ok
        return token_tiles(ok, m, 32)

    return prune


def token_tiles(configs: list, m: int, floor: int) -> list:
    """The configs whose token tile suits ``m`` rows: skinny tiles (``BLOCK_M`` <= 32) only for a few
    rows and none for many, and no tile past ``max(floor, next power of two >= m)``; all if none does."""
    cap = max(floor, triton.next_power_of_2(m))
    fit = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == (m <= 32) and c.kwargs["BLOCK_M"] <= cap]
    return fit or configs


# ---- kernel epilogue ---------------------------------------------------------------------------
@triton.jit
def bias_and_store(
    acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS: tl.constexpr
):  # fmt: skip
    """Add ``bias[offs_n]`` (when ``HAS_BIAS``) to the fp32 ``[BLOCK_N, BLOCK_M]`` accumulator and
    store it, cast to y's dtype, at ``y[offs_m, offs_n]`` (masked)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(
        y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_n[:, None] & mask_m[None, :],
    )


# ---- host side ---------------------------------------------------------------------------------
def check_bias_and_devices(who: str, n: int, bias: Tensor | None, tensors: dict[str, Tensor | None]) -> None:
    """Raise TypeError / ValueError for a bias that is not float ``[n]``, or ``tensors`` (name ->
    tensor or None; the last is the bias) on more than one device."""
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"{who}: bias.dtype={bias.dtype}, expected a float dtype")
        if bias.shape != (n,):
            raise ValueError(f"{who}: bias.shape={tuple(bias.shape)}, expected ({n},)")
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        got = sorted(map(str, devices))
        names = list(tensors)
        raise ValueError(f"{who}: {', '.join(names[:-1])} and {names[-1]} must share a device, got {got}")


def x_dtype_problem(x: Tensor, who: str) -> TypeError | None:
    """The kernels' x dtypes: fp32, fp16, bf16."""
    if x.dtype not in FLOAT_DTYPES:
        return TypeError(f"{who}: x.dtype={x.dtype}, expected float32, float16 or bfloat16")
    return None


def rows(x: Tensor) -> int:
    """Rows of ``x [..., K]`` as a matrix (0 for a scalar or K = 0)."""
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def launch_dequantize(
    kernel, weights: tuple[Tensor, ...], weight_strides: tuple[int, ...], n: int, k: int, dtype: torch.dtype,
    block_k: int, **constexprs,
) -> Tensor:  # fmt: skip
    """``W [n, k]`` in ``dtype`` from a family's dequantize kernel, one ``[32, block_k]`` tile a program;
    the kernel takes ``(*weights, w, N, K, *weight_strides, **constexprs, BLOCK_N, BLOCK_K)``."""
    w = torch.empty((n, k), dtype=dtype, device=weights[0].device)
    if w.numel():
        grid = (triton.cdiv(n, 32), triton.cdiv(k, block_k))
        launcher(kernel, w)[grid](*weights, w, n, k, *weight_strides, **constexprs, BLOCK_N=32, BLOCK_K=block_k)
    return w


def launcher(kernel, t: Tensor):
    """``kernel`` itself when ``t`` holds data, ``wrap_triton(kernel)`` while it is traced. Code that
    runs outside a ``triton_op`` (a ``custom_op`` body such as the dense prefill paths, an eager
    ``dequantize()``) sees ``wrap_triton`` on, and then every eager launch goes through the tracing
    HOP: ~600 µs of Python a launch on the CPU machine, against a direct launch's few."""
    return wrap_triton(kernel) if is_traced(t) else kernel


def launch(
    gemv_kernel,
    gemm_kernel,
    x: Tensor,
    weights: tuple[Tensor, Tensor, Tensor],
    weight_strides: tuple[int, ...],
    bias: Tensor | None,
    n: int,
    gemv_kwargs: dict | None = None,
    **constexprs,
) -> Tensor:
    """``y [M, N]`` in x's dtype for 2-D ``x [M, K]``: empty / zero-K cases on the host, else the
    GEMV kernel for ``M < MMA_MIN_ROWS`` (``BLOCK_M`` = next power of two >= M; plus ``gemv_kwargs``),
    the GEMM kernel from there on (``DOT_FP32`` for fp32 x or the interpreter). ``weights[1]`` (the
    scale) doubles as the bias pointer when there is no bias."""
    m, k = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    args = (
        x, *weights, bias if bias is not None else weights[1], y,
        m, n, k,
        x.stride(0), x.stride(1), *weight_strides, y.stride(0), y.stride(1),
    )  # fmt: skip
    constexprs["HAS_BIAS"] = bias is not None
    if m < MMA_MIN_ROWS:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
        # Groups of 16 leave only 16-wide K tiles, which miscompute at 16 rows (prune_gemv): 8 rows a
        # launch (only if MMA_MIN_ROWS is raised past 9).
        step = 8 if m > 8 and 16 in (constexprs.get("GROUP_SIZE"), constexprs.get("BLOCK_SIZE")) else m
        for i in range(0, m, step):
            rows = min(step, m - i)
            part = (x[i : i + rows], *args[1:5], y[i : i + rows], rows, *args[7:])
            extra = {**constexprs, **(gemv_kwargs or {})}
            wrap_triton(gemv_kernel)[grid](*part, **extra, BLOCK_M=triton.next_power_of_2(rows))
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))
        dot_fp32 = x.dtype == torch.float32 or interpreted()
        wrap_triton(gemm_kernel)[grid](*args, **constexprs, DOT_FP32=dot_fp32)
    return y
