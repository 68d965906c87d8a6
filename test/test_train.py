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
    setup,
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


# ---- bitnet: QAT, then the ternary conversion ---------------------------------------------------
def test_bitnet_trains_and_its_ternary_conversion_keeps_the_loss():
    cfg = replace(TINY, steps=20, warmup_steps=3, eval_interval=0, quantize="bitnet")
    result = train(cfg, progress=False)
    assert "BitNetTrainingLinearWeight" in result.summary
    # BitNet b1.58's layout: the blocks' Linears ternary, the embedding and the output head dense
    _, _, model, _ = setup(cfg)
    assert type(model.lm_head.weight) is torch.nn.Parameter
    assert all(type(m.weight).__name__ == "BitNetTrainingLinearWeight" for m in model.layers.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip
    assert result.final_train_loss < result.losses[0] - 0.3  # it learns (from ~ln 256 = 5.55)
    # convert_bitnet_to_ternary_ packs the very ternary values the forward used: same loss
    assert abs(result.converted_val_loss - result.final_val_loss) < 1e-4
    assert abs(result.converted_train_loss - result.final_train_loss) < 1e-4
    # the blocks' fp32 masters (4 bytes a weight) become 2-bit codes (1/4 byte) plus a scale each
    block_linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    n = sum(m.weight.numel() for m in block_linears)
    packed = result.weight_bytes - 4 * n + n // 4
    assert packed <= result.converted_weight_bytes <= packed + 16 * len(block_linears)
    dense = train(replace(TINY, quantize="none"), progress=False)
    assert dense.converted_val_loss is None and dense.converted_weight_bytes is None


# ---- nf4-dora / nf4-lora: adapters over a frozen NF4 base, from a dense checkpoint --------------
@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    train(replace(TINY, quantize="none", steps=20, warmup_steps=3, eval_interval=0, save=str(path)), progress=False)
    return path


@pytest.mark.parametrize("scheme", ["nf4-dora", "nf4-lora"])
def test_adapter_fine_tune_trains_only_the_adapters(dense_checkpoint, tmp_path, scheme):
    from quantframe.nf4 import NF4Tensor

    out = tmp_path / "tuned.pt"
    cfg = replace(TINY, quantize=scheme, steps=10, warmup_steps=2, lr=1e-2, eval_interval=0,
                  init_from=str(dense_checkpoint), save=str(out))  # fmt: skip
    result = train(cfg, progress=False)
    start, end = result.eval_losses[0], result.eval_losses[-1]
    assert start[0] == 0 and end[0] == cfg.steps
    assert end[1] <= start[1] and end[2] <= start[2]  # train and val loss after <= at the start
    dense = torch.load(dense_checkpoint, weights_only=True)
    tuned = torch.load(out, weights_only=True)
    adapted = {k.rpartition(".")[0] for k in tuned if k.endswith(".lora_A")}
    assert len(adapted) == 5 * TINY.n_layers + 1  # every quantize_filter Linear took an NF4 base
    for key, value in tuned.items():
        module, _, name = key.rpartition(".")
        if module not in adapted:  # embedding and norms: frozen, exactly as loaded
            assert torch.equal(value, dense[key]), key
        elif name == "weight":  # the frozen base: NF4 of the dense weight, untouched
            ref = NF4Tensor.from_float(dense[key], block_size=32, scaler_block_size=32)
            assert isinstance(value, NF4Tensor) and torch.equal(value.dequantize(), ref.dequantize()), key
        elif name == "lora_B":  # starts at zero; training moved it
            assert value.abs().max() > 0, key
        elif name == "magnitude":  # starts at the base's row norms; training moved it
            assert not torch.allclose(value, torch.linalg.vector_norm(tuned[f"{module}.weight"].dequantize(), dim=1))
    assert any(k.endswith(".magnitude") for k in tuned) == (scheme == "nf4-dora")


def test_adapter_schemes_need_a_fitting_dense_checkpoint(dense_checkpoint, tmp_path):
    needs = "quantize='nf4-dora' fine-tunes adapters over a frozen base, so it needs init_from"
    with pytest.raises(ValueError, match=needs):
        replace(TINY, quantize="nf4-dora")
    wider = replace(TINY, dim=64, quantize="nf4-dora", init_from=str(dense_checkpoint))
    with pytest.raises(ValueError, match=r"does not fit this config's model: tok_emb.weight: \(256, 32\) in the file, "
                                         r"\(256, 64\) in the model"):  # fmt: skip
        train(wider, progress=False)
    tuned = tmp_path / "tuned.pt"
    train(replace(TINY, quantize="nf4-lora", init_from=str(dense_checkpoint), save=str(tuned)), progress=False)
    with pytest.raises(ValueError, match="layers.0.attn.wqkv.weight is a NF4Tensor, not a plain tensor"):
        train(replace(TINY, quantize="nf4-dora", init_from=str(tuned)), progress=False)
