"""quantframe.train: the loop runs, int8-qt learns about as well as fp32, data is deterministic."""

import math
from dataclasses import replace

import pytest
import torch

from quantframe import Int8QTLinearWeight, quantize_
from quantframe.train import (
    SCHEMES,
    ByteData,
    ByteLM,
    TrainConfig,
    get_lr,
    load_stdlib_bytes,
    lm_loss,
    quantize_filter,
    train,
    weight_bytes,
)

# dim 32 / 2 heads keeps head_dim even (RoPE); 256 KiB of text is plenty for 16-byte windows.
# One thread: tiny matmuls gain nothing from two, and lose a lot when other jobs share the cores.
TINY = TrainConfig(dim=32, n_layers=1, n_heads=2, seq_len=16, batch_size=8, steps=3, eval_batches=2,
                   data_bytes=2**18, device="cpu", threads=1)  # fmt: skip


@pytest.mark.parametrize("scheme", ["none", "int8-qt"])
def test_three_steps_finish_with_finite_losses(scheme):
    result = train(replace(TINY, quantize=scheme), progress=False)
    assert result.scheme == scheme
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert math.isfinite(result.final_train_loss) and math.isfinite(result.final_val_loss)
    assert result.eval_losses[-1] == (3, result.final_train_loss, result.final_val_loss)
    assert result.tokens_per_s > 0 and result.wall_time_s > 0 and result.weight_bytes > 0
    assert result.peak_memory_kind == "peak RSS" and result.peak_memory_bytes > 2**20
    assert ("Int8QTLinearWeight" in result.summary) == (scheme == "int8-qt")


def test_int8_qt_loss_within_1_15x_of_float_run():
    # 40 steps of a small model: enough to fall far below ln(256) = 5.55 (uniform over bytes).
    cfg = replace(TINY, dim=64, n_layers=2, n_heads=4, seq_len=32, batch_size=16, steps=40, warmup_steps=5,
                  eval_interval=0, eval_batches=4)  # fmt: skip
    dense = train(replace(cfg, quantize="none"), progress=False)
    int8 = train(replace(cfg, quantize="int8-qt"), progress=False)
    initial = math.log(256)
    assert abs(int8.losses[0] - initial) < 0.1 and abs(dense.losses[0] - initial) < 0.1
    assert dense.final_train_loss < 0.7 * initial
    assert int8.final_train_loss < 0.7 * initial
    assert int8.final_train_loss < 1.15 * dense.final_train_loss
    assert int8.final_val_loss < 1.15 * dense.final_val_loss


def test_get_batch_is_deterministic_for_a_seed():
    text = torch.arange(4000, dtype=torch.int64).remainder(251).to(torch.uint8)
    a, b, c = ByteData(TINY, text), ByteData(TINY, text), ByteData(replace(TINY, seed=1), text)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = a.get_batch("train"), b.get_batch("train"), c.get_batch("train")
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
    assert xa.shape == ya.shape == (TINY.batch_size, TINY.seq_len) and xa.dtype == torch.int64
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the next bytes
    assert torch.equal((xa + 1) % 251, ya)  # ... of one contiguous window of the text
    assert a.get_batch("val")[0].min() >= 0 and len(a.splits["val"]) == 400


def test_stdlib_bytes_are_read_deterministically_and_capped():
    first, second = load_stdlib_bytes(100_000), load_stdlib_bytes(100_000)
    assert first.dtype == torch.uint8 and len(first) == 100_000
    assert torch.equal(first, second)
    assert torch.equal(load_stdlib_bytes(1_000), first[:1_000])


def test_int8_qt_weight_bytes_below_0_35x_of_float_for_quantized_layers():
    cfg = replace(TINY, dim=64)
    model = ByteLM(cfg)
    selected = lambda: [m.weight for name, m in model.named_modules() if quantize_filter(m, name)]  # noqa: E731
    dense = weight_bytes(selected())
    quantize_(model, SCHEMES["int8-qt"](), filter_fn=quantize_filter)
    assert all(isinstance(w, Int8QTLinearWeight) for w in selected())
    assert len(selected()) == 5 * cfg.n_layers + 1  # wqkv, wo, w1, w3, w2 per block + lm_head
    assert weight_bytes(selected()) < 0.35 * dense  # int8 codes + one fp32 scale per row
    assert type(model.tok_emb.weight) is torch.nn.Parameter  # the embedding stays dense


def test_clip_grad_norm_sees_plain_grads_of_int8_weights():
    model = ByteLM(TINY)
    quantize_(model, SCHEMES["int8-qt"](), filter_fn=quantize_filter)
    x, y = ByteData(TINY).get_batch("train")
    lm_loss(model, x, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(type(g) is torch.Tensor for g in grads)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(total, expected)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-3, atol=0)


def test_lr_warms_up_then_decays_to_a_tenth():
    cfg = replace(TINY, lr=1e-3, warmup_steps=10, steps=110)
    assert get_lr(0, cfg) == pytest.approx(1e-4)
    assert get_lr(9, cfg) == pytest.approx(1e-3)
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(59, cfg) < get_lr(30, cfg) < 1e-3
    assert get_lr(109, cfg) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantize": "int3"}, "quantize='int3' is not a scheme; valid: none, int8-qt"),
        ({"dim": 30, "n_heads": 4}, "dim=30 must split into n_heads=4 heads of even size"),
        ({"steps": 0}, "steps=0 must be >= 1"),
        ({"lr": -1.0}, "need lr > 0"),
    ],
)
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        replace(TINY, **change)
