"""quantframe.optim.AdamW8bit (8-bit moments) and AdamW's fused step for INT8 weights."""

import copy
import io

import pytest
import torch
from torch import nn

from quantframe import Int8QTLinearWeight, int8_weight_only_quantized_training, quantize_
from quantframe.kernels import adamw_step as fused
from quantframe.optim import AdamW, AdamW8bit, OptimState8bit


def mlp(seed=0, hidden=128):
    """Linear(64, hidden) and Linear(hidden, 32): weights of 8192 / 4096 elements, biases below 4096."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 32))


def train(model, opt, steps=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 64, generator=g) / 8  # a learnable target: y = teacher(x)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        loss = (model(x) - x @ teacher.T).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _rel(a, b):
    return ((a.detach() - b.detach()).norm() / b.detach().norm()).item()


def test_plain_params_track_torch_adamw():
    a, b, c = mlp(), mlp(), mlp()
    kw = dict(betas=(0.9, 0.99), weight_decay=0.1)
    la = train(a, AdamW8bit(a.parameters(), lr=1e-2, **kw))
    lb = train(b, torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False, **kw))
    train(c, torch.optim.AdamW(c.parameters(), lr=1.2e-2, foreach=False, **kw))  # a nearby run
    assert la[-1] < 0.2 * la[0]
    assert la[-1] == pytest.approx(lb[-1], rel=0.02)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        # 8-bit moments move the weights ~1.6% from torch's; a 20% larger lr moves them more.
        assert _rel(pa, pb) < 0.03 < _rel(pc, pb)


def test_large_params_get_8bit_states_by_global_numel():
    m = mlp()
    opt = AdamW8bit(m.parameters(), lr=1e-2, amsgrad=True)
    train(m, opt, steps=1)
    kinds = {name: {k: type(v).__name__ for k, v in opt.state[p].items()} for name, p in m.named_parameters()}
    eight = dict(step="Tensor", exp_avg="OptimState8bit", exp_avg_sq="OptimState8bit", max_exp_avg_sq="OptimState8bit")
    fp32 = dict(step="Tensor", exp_avg="Tensor", exp_avg_sq="Tensor", max_exp_avg_sq="Tensor")
    assert kinds == {"0.weight": eight, "0.bias": fp32, "2.weight": eight, "2.bias": fp32}
    signed = [opt.state[m[0].weight][k].signed for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    assert signed == [True, False, False]
    all8 = AdamW8bit([m[0].bias], min_8bit_size=0)
    all8.add_param_group({"params": [m[2].bias]})  # takes the optimizer's min_8bit_size
    train(m, all8, steps=1)
    assert isinstance(all8.state[m[0].bias]["exp_avg"], OptimState8bit)
    assert isinstance(all8.state[m[2].bias]["exp_avg"], OptimState8bit)


def _state_bytes_per_param(opt, params):
    storages = {}  # every inner tensor once: the code map is shared by all states of a kind
    for p in params:
        for name in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][name]
            for _, t in state._inner_tensors() if isinstance(state, OptimState8bit) else [(name, state)]:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) / sum(p.numel() for p in params)


def test_state_is_about_two_bytes_per_param():
    m8, m32 = mlp(hidden=512), mlp(hidden=512)  # weights of 32768 + 16384 elements
    opt8, opt32 = AdamW8bit(m8.parameters(), lr=1e-3), AdamW(m32.parameters(), lr=1e-3)
    train(m8, opt8, steps=1)
    train(m32, opt32, steps=1)
    # 1 byte of code + 4/256 of block scale per moment, + two 1 KB code maps; fp32 moments: 8 bytes
    assert _state_bytes_per_param(opt8, [m8[0].weight, m8[2].weight]) == 2 + 2 * 4 / 256 + 2048 / 49152  # 2.07
    assert _state_bytes_per_param(opt32, [m32[0].weight, m32[2].weight]) == 8.0


def test_int8_weights_with_8bit_states_follow_32bit_states():
    ref, q8 = mlp(hidden=256), mlp(hidden=256)  # Linear(64, 256): K=64 (unfused); Linear(256, 32): fused
    quantize_(ref, int8_weight_only_quantized_training())
    quantize_(q8, int8_weight_only_quantized_training())
    torch.manual_seed(3)
    l32 = train(ref, AdamW(ref.parameters(), lr=1e-2), steps=40)
    torch.manual_seed(3)
    l8 = train(q8, AdamW8bit(q8.parameters(), lr=1e-2), steps=40)
    assert isinstance(q8[0].weight, Int8QTLinearWeight)
    assert l8[-1] < 0.15 * l8[0]
    assert l8[-1] < 1.03 * l32[-1]  # within 0.3% here


def test_int8_weights_take_the_fused_step_where_rows_hold_whole_state_blocks(monkeypatch):
    m = mlp(hidden=256)
    quantize_(m, int8_weight_only_quantized_training())
    fused_shapes, requantized = [], []
    kernel, requantize = fused.adamw_step_multi, Int8QTLinearWeight.requantize_

    def spy(weights, **kw):
        fused_shapes.extend(w["int_data"].shape for w in weights)
        return kernel(weights, **kw)

    monkeypatch.setattr(fused, "adamw_step_multi", spy)
    monkeypatch.setattr(Int8QTLinearWeight, "requantize_", lambda w, v: requantized.append(w.shape) or requantize(w, v))
    train(m, AdamW8bit(m.parameters(), lr=1e-2), steps=2)
    # [256, 64]: K=64 is not whole blocks of 256 -> unfused, one requantization per step
    assert fused_shapes == [(32, 256)] * 2 and requantized == [(256, 64)] * 2
    fused_shapes.clear(), requantized.clear()
    train(m, AdamW(m.parameters(), lr=1e-2), steps=2)  # fp32 moments: fused for any K
    assert fused_shapes == [(256, 64), (32, 256)] * 2 and requantized == []
    train(m, AdamW(m.parameters(), lr=1e-2, amsgrad=True), steps=1)  # the kernel has no amsgrad
    assert requantized == [(256, 64), (32, 256)]


def test_fused_step_follows_the_unfused_one(monkeypatch):
    # The same algorithm; the unfused path computes lerp/addcmul with fused multiply-adds on CPU,
    # so results differ by an ulp here and there, and a few rounding decisions with them.
    a, b = mlp(), mlp()
    quantize_(a, int8_weight_only_quantized_training())
    quantize_(b, int8_weight_only_quantized_training())
    torch.manual_seed(5)
    la = train(a, AdamW(a.parameters(), lr=1e-2), steps=10)
    monkeypatch.setattr(AdamW, "_fused_item", staticmethod(lambda *args: None))
    torch.manual_seed(5)
    lb = train(b, AdamW(b.parameters(), lr=1e-2), steps=10)
    assert la == pytest.approx(lb, rel=1e-3)
    assert la[0] == lb[0]


def test_state_dict_round_trip_continues_identically():
    m = mlp(hidden=256)
    quantize_(m, int8_weight_only_quantized_training())
    opt = AdamW8bit(m.parameters(), lr=1e-2)
    train(m, opt, steps=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert isinstance(loaded["state"][0]["exp_avg"], OptimState8bit)
    m2 = copy.deepcopy(m)
    opt2 = AdamW8bit(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(loaded)
    assert opt2.state_dict()["state"][0]["step"].item() == 3
    torch.manual_seed(5)
    a = train(m, opt, steps=2, seed=9)
    torch.manual_seed(5)
    b = train(m2, opt2, steps=2, seed=9)
    assert a == b
    for p, p2 in zip(m.parameters(), m2.parameters()):
        s, s2 = opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"]
        codes = [t.codes if isinstance(t, OptimState8bit) else t for t in (s, s2)]
        assert torch.equal(*codes)


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit])
def test_load_state_dict_keeps_fp32_moments_of_bf16_params(cls):
    # torch.optim.Optimizer.load_state_dict casts floating states to the parameter's dtype
    p = nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = cls([p], lr=1e-3)
    opt.step()
    fresh = cls([p], lr=1e-3)
    fresh.load_state_dict(opt.state_dict())
    assert {k: v.dtype for k, v in fresh.state[p].items()} == dict.fromkeys(("step", "exp_avg", "exp_avg_sq"), torch.float32)
    fresh.step()
    assert fresh.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("value", [-1, 2.5, "4096"])
def test_bad_min_8bit_size_raises(value):
    with pytest.raises(ValueError, match=f"AdamW8bit: invalid min_8bit_size {value!r}; expected an int >= 0"):
        AdamW8bit(mlp().parameters(), min_8bit_size=value)


def test_bad_hyperparameters_raise_like_adamw():
    with pytest.raises(ValueError, match="AdamW: invalid betas"):
        AdamW8bit(mlp().parameters(), betas=(1.0, 0.9))
