import copy

import pytest
import torch
from torch import nn

import quantframe
from quantframe import Int8QTLinearWeight, int8_weight_only_quantized_training, quantize_
from quantframe.optim import AdamW


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def train(model, opt, steps=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 32, generator=g) / 32**0.5  # a learnable target: y = teacher(x)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        loss = (model(x) - x @ teacher.T).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_plain_params_match_torch_adamw(amsgrad, maximize):
    a, b = mlp(), mlp()
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    train(a, AdamW(a.parameters(), **kw))
    train(b, torch.optim.AdamW(b.parameters(), foreach=False, **kw))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)


def test_bf16_params_with_their_dtype_states_match_torch_adamw_bitwise():
    # state_dtype=None: moments in the parameter's dtype, as torch's AdamW; the plain parameters then
    # take torch's own fused kernel, so the result is torch's (fused=True) bit for bit.
    a, b = mlp().bfloat16(), mlp().bfloat16()
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opts = (AdamW(a.parameters(), state_dtype=None, **kw), torch.optim.AdamW(b.parameters(), fused=True, **kw))
    for model, opt in zip((a, b), opts):
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(16, 32, dtype=torch.bfloat16)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert {s["exp_avg"].dtype for s in AdamW(a.parameters(), state_dtype=None).state.values()} <= {torch.bfloat16}


@pytest.fixture
def fused_adamw_calls(monkeypatch) -> list[int]:
    """The number of parameters of each call of torch's fused AdamW kernel."""
    calls, fused = [], torch._fused_adamw_

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return fused(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    return calls


def test_plain_params_take_torchs_fused_kernel_in_one_call(fused_adamw_calls):
    calls = fused_adamw_calls
    m = mlp()
    quantize_(m, int8_weight_only_quantized_training())  # 2 INT8 weights (own kernel) + 2 plain biases
    train(m, AdamW(m.parameters(), lr=1e-2), steps=2)
    assert calls == [2, 2]
    calls.clear()
    params = list(mlp().bfloat16().parameters())  # bf16 params with fp32 moments: the fp32-copy path
    for p in params:
        p.grad = torch.randn_like(p)
    AdamW(params, lr=1e-2).step()
    assert calls == []
    AdamW(params, lr=1e-2, state_dtype=None).step()  # bf16 moments: torch's kernel, all four at once
    assert calls == [4]


def test_mixed_precision_float_weights_take_torchs_fused_kernel_bitwise(fused_adamw_calls):
    # int8_mixed_precision_training's weight is its float_data computed differently: the optimizer
    # updates float_data with torch's fused kernel (one call), bit for bit what a plain model gets.
    a, b = mlp().bfloat16(), mlp().bfloat16()
    quantize_(a, quantframe.int8_mixed_precision_training())
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, state_dtype=None)
    opt_a, opt_b = AdamW(a.parameters(), **kw), AdamW(b.parameters(), **kw)
    for _ in range(2):
        for p, q in zip(a.parameters(), b.parameters()):  # the same gradients for both models
            p.grad = torch.randn(p.shape, dtype=torch.bfloat16)
            q.grad = p.grad.clone()
        for opt in (opt_a, opt_b):
            opt.step()
            opt.zero_grad()
    assert fused_adamw_calls == [4, 4, 4, 4]
    assert type(a[0].weight).__name__ == "Int8MixedPrecisionLinearWeight"
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.float_data if hasattr(pa, "float_data") else pa, pb)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, None], ids=["fp32", "bf16", "param"])
def test_state_dtype_of_int8_and_plain_params(state_dtype):
    m = mlp().bfloat16()
    quantize_(m, int8_weight_only_quantized_training())
    opt = AdamW(m.parameters(), lr=1e-2, state_dtype=state_dtype)
    m(torch.randn(4, 32, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()
    want = state_dtype or torch.bfloat16  # an INT8 weight's dtype is its gradient's: bf16 here
    for p in m.parameters():
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == want
        assert opt.state[p]["exp_avg"].abs().sum() > 0
    fresh = AdamW(m.parameters(), lr=1e-2, state_dtype=state_dtype)
    fresh.load_state_dict(opt.state_dict())  # torch casts states to bf16; the group's dtype wins
    assert {fresh.state[p]["exp_avg"].dtype for p in m.parameters()} == {want}


def test_int8_training_with_bf16_states_follows_fp32_states():
    runs = []
    for state_dtype in (torch.float32, torch.bfloat16):
        m = mlp()
        quantize_(m, int8_weight_only_quantized_training())
        torch.manual_seed(0)
        runs.append(train(m, AdamW(m.parameters(), lr=1e-2, state_dtype=state_dtype), steps=30))
    assert runs[1][-1] < 0.5 * runs[1][0]
    assert abs(runs[1][-1] - runs[0][-1]) < 0.1 * runs[0][-1]


def test_quantized_params_are_requantized_once_per_step(monkeypatch):
    # Int8 weights take the fused step (quantframe.kernels.adamw_step: dequantize, fp32 AdamW,
    # stochastic-rounding requantize, all in one pass), the weights of one row length in one call.
    from quantframe.kernels import adamw_step as fused

    m = mlp()
    quantize_(m, int8_weight_only_quantized_training())
    calls, requantized = [], []
    kernel, requantize = fused.adamw_step_multi, Int8QTLinearWeight.requantize_
    monkeypatch.setattr(fused, "adamw_step_multi", lambda ws, **kw: calls.append(len(ws)) or kernel(ws, **kw))
    monkeypatch.setattr(Int8QTLinearWeight, "requantize_", lambda w, v, **kw: requantized.append(1) or requantize(w, v, **kw))
    train(m, AdamW(m.parameters(), lr=1e-2), steps=3)
    assert calls == [1, 1] * 3 and requantized == []  # two quantized weights (K 32 and 64), three steps
    train(m, AdamW(m.parameters(), lr=1e-2, amsgrad=True), steps=3)  # unfused: one requantize_ each
    assert calls == [1, 1] * 3 and len(requantized) == 3 * 2


def test_weights_of_one_row_length_share_one_fused_launch(monkeypatch):
    from quantframe.kernels import adamw_step as fused

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 16))
    quantize_(m, int8_weight_only_quantized_training())
    calls = []
    kernel = fused.adamw_step_multi
    monkeypatch.setattr(fused, "adamw_step_multi", lambda ws, **kw: calls.append(len(ws)) or kernel(ws, **kw))
    losses = train(m, AdamW(m.parameters(), lr=1e-2), steps=10)
    assert calls == [1, 3] * 10  # K=32: one weight; K=64: three weights in one launch
    assert losses[-1] < losses[0]


def test_step_plans_are_reused_and_the_kernel_checks_run_once_per_layout(monkeypatch):
    # The per-parameter decisions are cached while the tensors they read stay the same objects; the
    # fused kernel's argument checks run on a layout's first launch only, and again after anything
    # the plan read changes (new state tensors).
    from quantframe.kernels import adamw_step as fused

    checks = []
    real = fused._multi_args
    monkeypatch.setattr(fused, "_multi_args", lambda ws, kw: checks.append(len(ws)) or real(ws, kw))
    m = mlp()
    quantize_(m, int8_weight_only_quantized_training())  # two INT8 weights, rows of 32 and 64
    opt = AdamW(m.parameters(), lr=1e-2)
    train(m, opt, steps=3)
    assert checks == [1, 1]  # step 1 only: one launch per row length
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors: planned and checked again
    train(m, opt, steps=2)
    assert checks == [1, 1, 1, 1]
    w = m[0].weight
    opt.state[w]["exp_avg"] = opt.state[w]["exp_avg"].clone()  # one moment replaced: that weight re-planned
    train(m, opt, steps=1)
    assert checks == [1, 1, 1, 1, 1]


def test_a_plan_follows_a_replaced_inner_tensor():
    # A plan holds the tensor it updates (here a mixed-precision weight's float_data); replacing
    # that tensor makes the next step plan again and update the new one.
    m = mlp().bfloat16()
    quantize_(m, quantframe.int8_mixed_precision_training())
    opt = AdamW(m.parameters(), lr=1e-2, state_dtype=None)
    w = m[0].weight
    for _ in range(2):
        w.grad = torch.ones(w.shape, dtype=torch.bfloat16)
        opt.step()
        w.float_data = w.float_data.clone()
        before = w.float_data.clone()
    w.grad = torch.ones(w.shape, dtype=torch.bfloat16)
    opt.step()
    assert not torch.equal(w.float_data, before)


def test_a_launch_that_failed_its_checks_is_checked_again(monkeypatch):
    from quantframe.kernels import adamw_step as fused

    real, calls = fused._multi_args, []

    def failing_once(ws, kw):
        calls.append(len(ws))
        if len(calls) == 1:
            raise ValueError("bad arguments")
        return real(ws, kw)

    monkeypatch.setattr(fused, "_multi_args", failing_once)
    m = mlp()
    quantize_(m, int8_weight_only_quantized_training())
    opt = AdamW(m.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="bad arguments"):
        train(m, opt, steps=1)
    opt.zero_grad()
    train(m, opt, steps=1)
    assert len(calls) == 3  # the failed launch's weight is checked again; the other was never launched


def test_int8_training_follows_the_float_run():
    ref = mlp()
    q = copy.deepcopy(ref)
    quantize_(q, int8_weight_only_quantized_training())
    ref_losses = train(ref, AdamW(ref.parameters(), lr=3e-3), steps=60)
    q_losses = train(q, AdamW(q.parameters(), lr=3e-3), steps=60)
    assert q_losses[-1] < 0.5 * q_losses[0]
    assert q_losses[-1] < 1.1 * ref_losses[-1]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-3, foreach=False),
        lambda p: torch.optim.AdamW(p, lr=3e-3, foreach=False),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False),
    ],
    ids=["Adam", "AdamW", "SGD"],
)
def test_torch_optimizers_train_quantized_weights(make_opt):
    m = mlp()
    quantize_(m, int8_weight_only_quantized_training())
    losses = train(m, make_opt(m.parameters()), steps=40)
    assert isinstance(m[0].weight, Int8QTLinearWeight)
    assert losses[-1] < 0.6 * losses[0]


def test_small_updates_survive_only_with_stochastic_rounding():
    # Updates of ~1/10 of a bf16 ulp: round-to-nearest drops them all, SR keeps them on average.
    start = torch.full((4096,), 1.0, dtype=torch.bfloat16)
    moved = {}
    for sr in (False, True):
        p = nn.Parameter(start.clone())
        opt = AdamW([p], lr=1e-3 * 2**-7 / 10 / 1e-3, betas=(0.0, 0.0), weight_decay=0.0, bf16_stochastic_round=sr)
        for _ in range(20):
            p.grad = -torch.ones_like(p)  # Adam step = lr * sign(grad) when betas are 0
            opt.step()
        moved[sr] = (p.float() - 1.0).mean().item()
    expected = 20 * 2**-7 / 10
    assert moved[False] == 0.0
    assert abs(moved[True] - expected) < 0.2 * expected


def test_state_dict_round_trip_continues_identically():
    m = mlp()
    quantize_(m, int8_weight_only_quantized_training())
    opt = AdamW(m.parameters(), lr=1e-2)
    train(m, opt, steps=3)
    m2 = copy.deepcopy(m)
    opt2 = AdamW(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state_dict()["state"][0]["step"].item() == 3
    torch.manual_seed(5)
    a = train(m, opt, steps=2, seed=9)
    torch.manual_seed(5)
    b = train(m2, opt2, steps=2, seed=9)
    assert a == b


@pytest.mark.parametrize(
    "kw, msg",
    [(dict(lr=-1.0), "invalid learning rate -1.0"), (dict(betas=(1.0, 0.9)), "invalid betas"), (dict(eps=-1.0), "invalid eps"),
     (dict(weight_decay=-0.1), "invalid weight_decay"),
     (dict(state_dtype=torch.float16), r"invalid state_dtype torch.float16; expected torch.float32, torch.bfloat16 or None")],
)
def test_bad_hyperparameters_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        AdamW(mlp().parameters(), **kw)


def test_optim_is_exported():
    assert quantframe.optim.AdamW is AdamW


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=3e-3, foreach=True),
        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-3, foreach=True),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=True),
    ],
    ids=["AdamW", "Adam", "SGD"],
)
def test_torch_foreach_optimizers_match_their_per_tensor_form(make_opt):
    # foreach=True is torch's default for CUDA and DTensor params: the list ops must act like the
    # per-tensor ones (same math, one stochastic rounding per in-place op). The random draws come
    # in another order (all mul_ first, then all addcdiv_), so the runs agree to SR noise only.
    a = mlp()
    quantize_(a, int8_weight_only_quantized_training())
    b = copy.deepcopy(a)
    opt_a = make_opt(a.parameters())
    opt_b = make_opt(b.parameters())
    for group in opt_b.param_groups:
        group["foreach"] = False
    torch.manual_seed(3)
    la = train(a, opt_a, steps=30)
    torch.manual_seed(3)
    lb = train(b, opt_b, steps=30)
    assert la[-1] < 0.6 * la[0]
    assert la == pytest.approx(lb, rel=1e-2)
