"""Which kernel a few rows of x take (kernels._weight_mm.MMA_MIN_ROWS): the GEMV kernel below it, the
tensor-core GEMM kernel (its skinny BLOCK_M = 16 tiles on a GPU) from it on; both equal the reference.
Runs under TRITON_INTERPRET=1 on CPU tensors (test/conftest.py)."""

import pytest
import torch
import triton

import quantframe.kernels._weight_mm as wmm
import quantframe.kernels.ternary_mm as ternary_mm_module
from quantframe.kernels.affine_mm import affine_mm_reference, affine_mm_triton
from quantframe.kernels.nf4_mm import nf4_mm_reference, nf4_mm_triton
from quantframe.kernels.ternary_mm import ternary_mm_reference, ternary_mm_triton
from quantframe.nf4 import NF4_LEVELS
from quantframe.ternary import TernaryWeight


def _recording(monkeypatch, module):
    """Replace ``module.wrap_triton`` by one that notes each launched kernel's name."""
    names = []
    real = module.wrap_triton

    def wrap(kernel):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return real(kernel)

    monkeypatch.setattr(module, "wrap_triton", wrap)
    return names


def _affine(m):
    torch.manual_seed(0)
    q, s = torch.randint(-127, 128, (40, 64), dtype=torch.int8), torch.rand(40, 1) * 0.02
    z = torch.zeros(40, 1, dtype=torch.int32)
    x = torch.randn(m, 64)
    return affine_mm_triton(x, q, s, z, 8, None), affine_mm_reference(x, q, s, z, 8, None)


def _nf4(m):
    torch.manual_seed(0)
    codes, scale = torch.randint(0, 256, (40, 32), dtype=torch.uint8), torch.rand(40 * 64 // 32) + 0.1
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    x = torch.randn(m, 64)
    return nf4_mm_triton(x, codes, scale, levels, 32), nf4_mm_reference(x, codes, scale, levels, 32)


@pytest.mark.parametrize("family", [_affine, _nf4], ids=["affine", "nf4"])
@pytest.mark.parametrize("m, kernel", [(1, "gemv"), (2, "gemm"), (5, "gemm")])
def test_rows_from_mma_min_rows_take_the_gemm_kernel(monkeypatch, family, m, kernel):
    monkeypatch.setattr(wmm, "MMA_MIN_ROWS", 2)
    names = _recording(monkeypatch, wmm)
    y, ref = family(m)
    assert [n.split("_")[-2] for n in names] == [kernel]  # _<family>_gemv_kernel / _<family>_gemm_kernel
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m, kernel", [(1, "gemv"), (3, "gemm")])
def test_ternary_rows_from_mma_min_rows_take_the_gemm_kernel(monkeypatch, m, kernel):
    monkeypatch.setattr(wmm, "MMA_MIN_ROWS", 2)
    names = _recording(monkeypatch, ternary_mm_module)
    w, x = TernaryWeight.from_float(torch.randn(24, 64)), torch.randn(m, 64)
    y = ternary_mm_triton(x, w.packed, w.scale)
    assert kernel in [n.split("_")[-2] for n in names]
    torch.testing.assert_close(y, ternary_mm_reference(x, w.packed, w.scale), rtol=1e-5, atol=1e-4)


def test_gemm_prune_keeps_skinny_tiles_for_few_rows_only():
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_M": bm, "BLOCK_K": k}) for n, bm, k, _, _ in wmm.GEMM_SHAPES]
    prune = wmm.prune_gemm("GROUP_SIZE")
    for m, skinny in ((1, True), (16, True), (17, True), (33, False), (4096, False)):
        kept = prune(configs, {"M": m}, GROUP_SIZE=0, DOT_FP32=False)
        assert kept and all((c.kwargs["BLOCK_M"] == 16) == skinny for c in kept), m
    assert all(c.kwargs["BLOCK_M"] <= 64 for c in prune(configs, {"M": 40}, GROUP_SIZE=0, DOT_FP32=False))
    # a group no skinny tile divides (32): the general tiles that divide it
    assert {c.kwargs["BLOCK_K"] for c in prune(configs, {"M": 4}, GROUP_SIZE=32, DOT_FP32=False)} == {32}
