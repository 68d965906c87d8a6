import pytest
import torch

from quantframe import primitives as P


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 2, 24)], ids=lambda s: "x".join(map(str, s)))
def test_pack_unpack_round_trip_is_exact(bits, shape):
    q = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    p = P.pack_bits(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(P.unpack_bits(p, bits, shape[-1]), q)


def test_every_code_round_trips():
    for bits in (2, 3, 4):
        q = torch.arange(2**bits, dtype=torch.uint8).repeat(8).view(1, -1)
        assert torch.equal(P.unpack_bits(P.pack_bits(q, bits), bits), q)


def test_int4_layout_first_element_in_low_nibble():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert P.pack_int4(q).tolist() == [[0x21, 0x0F]]
    assert torch.equal(P.unpack_int4(P.pack_int4(q)), q)


def test_2bit_and_3bit_layouts_match_hand_worked_bytes():
    q2 = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert P.pack_bits(q2, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    q3 = torch.tensor([[7, 1, 0, 0, 0, 0, 0, 5]], dtype=torch.uint8)
    word = 7 | 1 << 3 | 5 << 21
    assert P.pack_bits(q3, 3).tolist() == [[word & 255, word >> 8 & 255, word >> 16]]


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        P.pack_bits(torch.zeros(1, 8, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match=r"expected uint8 codes, got torch.int8"):
        P.pack_bits(torch.zeros(1, 8, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match=r"last dim 6 must be a multiple of 8 for 3-bit"):
        P.pack_bits(torch.zeros(1, 6, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\], got max 16"):
        P.pack_int4(torch.full((1, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"k=7 does not match"):
        P.unpack_bits(torch.zeros(1, 4, dtype=torch.uint8), 4, 7)
