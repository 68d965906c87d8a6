"""quantframe.kernels.adamw_step: reference vs a slow per-element loop; Triton vs reference.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py); with
the same noise it agrees with the reference bit for bit (int8, scales and states).
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import quantframe.kernels.adamw_step as adamw_step_module
from quantframe.kernels.adamw_step import (
    _map_info,
    _nearest_code,
    adamw_step,
    adamw_step_multi,
    adamw_step_multi_triton,
    adamw_step_reference,
    adamw_step_triton,
)
from quantframe.optim.state8bit import OptimState8bit, create_dynamic_map

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
             bias_correction1=1 - 0.9**3, bias_correction2=1 - 0.999**3)  # fmt: skip


def _inputs(n, k, states, grad_dtype=torch.float32):
    """A weight, a gradient, moments as after a few steps, and the rounding noise."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 1e-2 + 1e-3
    grad = torch.randn(n, k).to(grad_dtype)
    m, v = torch.randn(n, k) * 0.1, torch.rand(n, k) * torch.logspace(-6, -2, k)  # v spans decades
    if states == "8bit":
        m, v = OptimState8bit.from_float(m, signed=True), OptimState8bit.from_float(v, signed=False)
    elif states == "bf16":
        m, v = m.bfloat16(), v.bfloat16()
    return dict(q=q, scale=scale, grad=grad, m=m, v=v, noise=torch.rand(n, k))


def _run(impl, inp, **kw):
    """Apply ``impl`` to copies of ``inp``; return every tensor it wrote."""
    q, scale, m, v = inp["q"].clone(), inp["scale"].clone(), inp["m"], inp["v"]
    if isinstance(m, OptimState8bit):
        parts = dict(exp_avg_scale=m.scale.clone(), exp_avg_sq_scale=v.scale.clone(),
                     exp_avg_qmap=m.qmap, exp_avg_sq_qmap=v.qmap)  # fmt: skip
        m, v = m.codes.clone(), v.codes.clone()
    else:
        parts, m, v = {}, m.clone(), v.clone()
    impl(q, scale, inp["grad"], m, v, noise=inp["noise"], **parts, **{**HYPER, **kw})
    return dict(int_data=q, scale=scale, exp_avg=m, exp_avg_sq=v,
                **{k: t for k, t in parts.items() if k.endswith("_scale")})  # fmt: skip


# (n, k, states): K off block multiples for fp32 states; rows of 2-4 chunks of 2048 are held in
# registers, longer ones take two passes.
CASES = [
    pytest.param(1, 1, "fp32", id="N1-K1-fp32"),
    pytest.param(3, 33, "fp32", id="N3-K33-fp32"),
    pytest.param(5, 127, "fp32", id="N5-K127-fp32"),
    pytest.param(2, 4100, "fp32", id="N2-K4100-fp32-3-chunks"),
    pytest.param(2, 8200, "fp32", id="N2-K8200-fp32-two-pass"),
    pytest.param(3, 33, "bf16", id="N3-K33-bf16"),
    pytest.param(2, 5632, "bf16", id="N2-K5632-bf16-3-chunks"),
    pytest.param(1, 8193, "bf16", id="N1-K8193-bf16-two-pass"),
    pytest.param(3, 256, "8bit", id="N3-K256-8bit"),
    pytest.param(2, 512, "8bit", id="N2-K512-8bit"),
    pytest.param(1, 4352, "8bit", id="N1-K4352-8bit-3-chunks"),
    pytest.param(1, 8448, "8bit", id="N1-K8448-8bit-two-pass"),
]


def test_row_lengths_take_the_paths_the_cases_name():
    tiles = adamw_step_module._tiles
    assert [tiles(k, False)["CHUNKS"] for k in (1, 2048, 2049, 5632, 8192, 8193)] == [1, 1, 2, 3, 4, 0]
    assert [tiles(k, True)["CHUNKS"] for k in (256, 2048, 4352, 8192, 8448)] == [1, 1, 3, 4, 0]


@pytest.mark.parametrize("n, k, states", CASES)
def test_triton_matches_reference_exactly(n, k, states):
    inp = _inputs(n, k, states)
    ref, out = _run(adamw_step_reference, inp), _run(adamw_step_triton, inp)
    assert (ref["int_data"] != inp["q"]).any()  # the step moved the weight
    for name, t in ref.items():
        assert torch.equal(out[name], t), name


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("states", ["fp32", "bf16", "8bit"])
def test_triton_matches_reference_with_16bit_grads_and_maximize(states, grad_dtype):
    inp = _inputs(2, 256, states, grad_dtype)
    ref = _run(adamw_step_reference, inp, maximize=True)
    out = _run(adamw_step_triton, inp, maximize=True)
    for name, t in ref.items():
        assert torch.equal(out[name], t), name


def test_triton_without_noise_draws_unbiased_rounding():
    inp = _inputs(4, 512, "fp32")
    inp["noise"] = None
    q = _run(adamw_step_triton, inp)["int_data"]
    floor = _run(adamw_step_reference, {**inp, "noise": torch.zeros(4, 512).add_(1 - 2**-24)})["int_data"]
    ceil_ = _run(adamw_step_reference, {**inp, "noise": torch.zeros(4, 512)})["int_data"]
    assert bool(((q == floor) | (q == ceil_)).all())
    frac = (q != floor).float().mean()
    assert 0.3 < frac < 0.7  # rounding up about as often as the fractions say (~0.5 here)


@triton.jit
def _uniform_kernel(out_ptr, seed, first, N: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, N), adamw_step_module._uniform(seed, first, N))


def _draws(seed, first, n):
    out = torch.empty(n)
    _uniform_kernel[(1,)](out, seed, first, n)
    return out


def test_in_kernel_draws_are_16_bit_centred_uniform_and_independent_of_the_tiling():
    u = torch.cat([_draws(seed, 0, 4096) for seed in (1, 2)])
    k = u * 65536 - 0.5  # u = (k + 1/2) / 2**16, k integer in [0, 2**16)
    assert torch.equal(k, k.round()) and 0 <= k.min() and k.max() < 65536
    n = u.numel()
    assert abs(u.mean() - 0.5) < 4 * (1 / 12 / n) ** 0.5
    counts = torch.histc(u, bins=16, min=0, max=1)
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
    assert chi2 < 45  # 15 degrees of freedom: p ~ 1e-4
    pairs = u.view(-1, 2)  # the two halves of one 32-bit draw
    corr = torch.corrcoef(pairs.T)[0, 1]
    assert abs(corr) < 4 / (n / 2) ** 0.5
    # element i's draw depends on (seed, first + i) only: chunks of a row draw what the whole row does
    assert torch.equal(torch.cat([_draws(7, 64, 64), _draws(7, 128, 64)]), _draws(7, 64, 128))
    assert not torch.equal(_draws(7, 0, 64), _draws(8, 0, 64))


def _slow_loop(inp, state_map=None):
    """One row, element by element in numpy float32 scalars: the AdamW step as written in papers."""
    f = np.float32
    lr, wd, b1, b2, eps = (HYPER[k] for k in ("lr", "weight_decay", "beta1", "beta2", "eps"))
    bc1, bc2 = HYPER["bias_correction1"], HYPER["bias_correction2"]
    m_in, v_in = (t.dequantize() if state_map else t for t in (inp["m"], inp["v"]))
    p, m, v = [], [], []
    for j in range(inp["q"].shape[1]):
        pj = f(inp["q"][0, j].item()) * f(inp["scale"][0].item())
        g, mj, vj = f(inp["grad"][0, j].item()), f(m_in[0, j].item()), f(v_in[0, j].item())
        pj = pj * f(1 - lr * wd)
        mj = mj + f(1 - b1) * (g - mj)
        vj = vj * f(b2) + f(1 - b2) * (g * g)
        pj = pj + f(-lr / bc1) * (mj / (np.sqrt(vj) / f(np.sqrt(bc2)) + f(eps)))
        p, m, v = p + [pj], m + [mj], v + [vj]
    new_scale = max(max(abs(x) for x in p) / f(127), f(1e-12))
    codes = []
    for pj, u in zip(p, inp["noise"][0].tolist()):
        x = pj / new_scale
        lo = np.floor(x)
        codes.append(int(min(max(lo + (f(u) < x - lo), -127), 127)))
    return codes, float(new_scale), m, v


@pytest.mark.parametrize("states", ["fp32", "8bit"])
def test_reference_matches_a_slow_loop_over_one_row(states):
    inp = _inputs(1, 512, states)
    ref = _run(adamw_step_reference, inp)
    codes, new_scale, m, v = _slow_loop(inp, state_map=states == "8bit")
    assert ref["int_data"][0].tolist() == codes
    assert ref["scale"].item() == new_scale
    if states == "fp32":
        assert ref["exp_avg"][0].tolist() == m and ref["exp_avg_sq"][0].tolist() == v
    else:  # the stored state is the 8-bit image of the loop's fp32 moment, as OptimState8bit makes it
        for name, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            expected = OptimState8bit.from_float(torch.tensor([value]), signed=signed)
            assert torch.equal(ref[name], expected.codes), name
            assert torch.equal(ref[f"{name}_scale"], expected.scale), name


@triton.jit
def _codes_kernel(x_ptr, mid_ptr, out_ptr, n, MAP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _nearest_code(x, mid_ptr, MAP), mask=mask)


def _code_probes(qmap: torch.Tensor) -> torch.Tensor:
    """Values in the map's range: every code, every midpoint and its two fp32 neighbours (the ties
    and the nearest non-ties), log-uniform magnitudes down to 1e-11, 0 and the ends."""
    mids = (qmap[1:] + qmap[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    mags = torch.exp(torch.empty(20_000).uniform_(-25.5, 0.0, generator=g))
    x = torch.cat([qmap, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                   mags, -mags, torch.tensor([0.0, 1.0, -1.0, 1e-7, 1e-6, 0.1])])  # fmt: skip
    return x.clamp(float(qmap[0]), 1.0)


def _close_codes_map():
    """A sorted map with three codes within 1e-4 of 0.5: two midpoints share a bucket."""
    return torch.cat([torch.linspace(-1, 1, 253), torch.tensor([0.5001, 0.5002, 0.5003])]).sort().values


MAPS = {
    "dynamic-signed": lambda: create_dynamic_map(True),
    "dynamic-unsigned": lambda: create_dynamic_map(False),
    "linear": lambda: torch.linspace(-1, 1, 256),
    "close-codes": _close_codes_map,
}


def _check_nearest_code(name, device):
    qmap = MAPS[name]().to(device)
    info, kind = _map_info(qmap)
    assert kind == (0 if name == "close-codes" else 1)
    assert info.numel() == (255 if kind == 0 else 256 + 65536)
    edges = (torch.arange(0x7F81, dtype=torch.int32) << 16).view(torch.float32)  # bucket ends, 0 to inf
    edges = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0))])
    x = torch.cat([_code_probes(qmap.cpu()), edges, -edges,
                   torch.tensor([2.0, -2.0, 3e38, -3e38, 1e-30, -1e-30, -0.0])]).to(device)  # fmt: skip
    expected = torch.bucketize(x, info[:255]).to(torch.int32)
    for map_kind in sorted({kind, 0}):
        out = torch.empty_like(expected)
        _codes_kernel[(triton.cdiv(x.numel(), 1024),)](x, info, out, x.numel(), MAP=map_kind, BLOCK=1024)
        assert torch.equal(out, expected), (map_kind, (out != expected).sum())


@pytest.mark.parametrize("name", MAPS)
def test_nearest_code_equals_bucketize(name):
    # The bucketed lookup (two loads) and the binary search must both equal torch.bucketize on the
    # midpoints everywhere: ties, bucket and decade edges, tiny and out-of-range values. The maps
    # whose codes are far enough apart take the buckets; one with codes 1e-4 apart the search.
    _check_nearest_code(name, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", MAPS)
def test_nearest_code_equals_bucketize_on_cuda(name):
    _check_nearest_code(name, "cuda")


def test_map_info_is_cached_and_follows_in_place_writes():
    qmap = create_dynamic_map(True)
    info, kind = _map_info(qmap)
    assert kind == 1 and torch.equal(info[:255], (qmap[1:] + qmap[:-1]) / 2)
    assert _map_info(qmap)[0] is info  # cached: the table is built once per map
    qmap[3] = 0.5  # written in place (now unsorted): the cached entry is stale, the map takes the search
    assert _map_info(qmap)[1] == 0


def test_dispatcher_takes_the_reference_on_cpu():
    inp = _inputs(2, 256, "8bit")
    ref, out = _run(adamw_step_reference, inp), _run(adamw_step, inp)
    for name, t in ref.items():
        assert torch.equal(out[name], t), name


def _bad(**changes):
    """Valid fp32-state arguments for [2, 256], with ``changes`` applied."""
    args = dict(int_data=torch.zeros(2, 256, dtype=torch.int8), scale=torch.ones(2), grad=torch.zeros(2, 256),
                exp_avg=torch.zeros(2, 256), exp_avg_sq=torch.zeros(2, 256), **HYPER)  # fmt: skip
    args.update(changes)
    return args


CODES = torch.zeros(2, 256, dtype=torch.uint8)
BAD = [
    pytest.param(TypeError, r"adamw_step: int_data must be 2-D int8 \[N, K\], got torch.float32",
                 dict(int_data=torch.zeros(2, 256)), id="int_data-dtype"),
    pytest.param(ValueError, r"adamw_step: scale must be float32 \[2\], got torch.float32 \(3,\)",
                 dict(scale=torch.ones(3)), id="scale-shape"),
    pytest.param(ValueError, r"adamw_step: grad must be float \[2, 256\], got torch.float32 \(2, 255\)",
                 dict(grad=torch.zeros(2, 255)), id="grad-shape"),
    pytest.param(TypeError, r"exp_avg_sq must both be float32, both bfloat16 or both uint8 codes, got torch.uint8 and torch.float32",
                 dict(exp_avg=CODES), id="mixed-states"),
    pytest.param(ValueError, r"adamw_step: states must be \[2, 256\], got \(2, 256\), \(512,\)",
                 dict(exp_avg_sq=torch.zeros(512)), id="state-shape"),
    pytest.param(ValueError, r"adamw_step: 8-bit states need K=128 to be a multiple of 256",
                 dict(int_data=torch.zeros(4, 128, dtype=torch.int8), scale=torch.ones(4), grad=torch.zeros(4, 128),
                      exp_avg=CODES.view(4, 128), exp_avg_sq=CODES.view(4, 128)), id="8bit-K-not-a-block-multiple"),
    pytest.param(ValueError, r"adamw_step: 8-bit states need exp_avg_scale float32 \[2\], got None",
                 dict(exp_avg=CODES, exp_avg_sq=CODES), id="8bit-without-scale"),
    pytest.param(ValueError, r"adamw_step: state scales and qmaps are only for uint8",
                 dict(exp_avg_qmap=torch.zeros(256)), id="fp32-with-qmap"),
    pytest.param(ValueError, r"the states are written in place and must be contiguous",
                 dict(exp_avg=torch.zeros(256, 2).T), id="non-contiguous"),
    pytest.param(ValueError, r"adamw_step: noise must be float32 \[2, 256\], got torch.float64",
                 dict(noise=torch.zeros(2, 256, dtype=torch.float64)), id="noise-dtype"),
    pytest.param(ValueError, r"adamw_step: all tensors must share a device, got \['cpu', 'meta'\]",
                 dict(grad=torch.zeros(2, 256, device="meta")), id="devices"),
    pytest.param(ValueError, r"adamw_step: bias corrections must be in \(0, 1\], got \(0.0, ",
                 dict(bias_correction1=0.0), id="bias-correction"),
]  # fmt: skip


@pytest.mark.parametrize("impl", [adamw_step_reference, adamw_step_triton], ids=["reference", "triton"])
@pytest.mark.parametrize("error, msg, changes", BAD)
def test_bad_arguments_raise(impl, error, msg, changes):
    args = _bad(**changes)
    with pytest.raises(error, match=msg):
        impl(*[args.pop(k) for k in ("int_data", "scale", "grad", "exp_avg", "exp_avg_sq")], **args)


# ---- GPU: real sizes (CPU siblings above) ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2048, 5632), (1000, 2048)], ids=["2048x5632-two-pass", "1000x2048"])
@pytest.mark.parametrize("states", ["fp32", "bf16", "8bit"])
def test_triton_matches_reference_on_cuda(shape, states):
    inp = {k: v.cuda() for k, v in _inputs(*shape, states, torch.bfloat16).items()}
    ref, out = _run(adamw_step_reference, inp), _run(adamw_step, inp)
    # The GPU's fast division and square root (<= 2 ulp) and FMA contraction can move a value by an
    # ulp or two and flip a rounding decision, rarely.
    for name, t in ref.items():
        if t.dtype in (torch.int8, torch.uint8):
            diff = (out[name].int() - t.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4, name
        else:
            # measured on H100: at most 6e-8 absolute on moments of magnitude <= 0.82 (an fp32 ulp);
            # a bf16 moment may round the other way (one bf16 ulp, 2**-8 relative), rarely; atol for
            # moments that cancel to near 0, where an fp32 ulp of the operands is a large relative error
            tol = dict(rtol=2**-7, atol=1e-6) if t.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out[name], t, **tol, msg=name)
            if t.dtype == torch.bfloat16:  # the one-ulp tolerance is wide there: few may use it
                assert (out[name] != t).float().mean() < 1e-3, name


# ---- many weights in one launch -------------------------------------------------------------------
def _weights(rows, k, states, grad_dtype=torch.float32):
    """adamw_step_multi's per-weight dicts (copies) and the shared keyword arguments."""
    weights, shared = [], dict(HYPER)
    for n in rows:
        inp = _inputs(n, k, states, grad_dtype)
        w = dict(int_data=inp["q"].clone(), scale=inp["scale"].clone(), grad=inp["grad"])
        m, v = inp["m"], inp["v"]
        if isinstance(m, OptimState8bit):
            w.update(exp_avg=m.codes.clone(), exp_avg_sq=v.codes.clone(),
                     exp_avg_scale=m.scale.clone(), exp_avg_sq_scale=v.scale.clone())  # fmt: skip
            shared.update(exp_avg_qmap=m.qmap, exp_avg_sq_qmap=v.qmap)
        else:
            w.update(exp_avg=m.clone(), exp_avg_sq=v.clone())
        weights.append(w)
    return weights, shared


def _copy(weights):
    return [{name: t.clone() for name, t in w.items()} for w in weights]


@pytest.mark.parametrize("rows, k, states", [
    pytest.param((3, 1, 5), 33, "fp32", id="K33-fp32"),
    pytest.param((2, 4), 4100, "bf16", id="K4100-bf16-two-pass"),
    pytest.param((3, 1), 512, "8bit", id="K512-8bit"),
    pytest.param((1, 2), 4352, "8bit", id="K4352-8bit-two-pass"),
])  # fmt: skip
def test_multi_launch_equals_one_launch_per_weight_with_seed_plus_t(rows, k, states):
    # One launch for several weights (rows differ; programs past a weight's rows do nothing) gives
    # each weight exactly what its own launch gives with seed + t.
    weights, shared = _weights(rows, k, states, torch.bfloat16)
    multi, single = _copy(weights), _copy(weights)
    adamw_step_multi_triton(multi, seed=1234, **shared)
    for t, w in enumerate(single):
        adamw_step_triton(**w, **shared, seed=1234 + t)
    for t, (a, b) in enumerate(zip(multi, single)):
        assert (a["int_data"] != weights[t]["int_data"]).any()  # the step moved every weight
        for name in a:
            assert torch.equal(a[name], b[name]), (t, name)


def test_multi_launch_of_unaligned_tensors_launches_each_weight(monkeypatch):
    # The one-launch kernel reads 16-byte aligned tensors (vectorized loads); a weight whose tensor
    # starts elsewhere (here int8 data one byte into a buffer) sends the group to one launch each.
    weights, shared = _weights((2, 3), 64, "bf16", torch.bfloat16)
    buf = torch.zeros(weights[1]["int_data"].numel() + 1, dtype=torch.int8)
    weights[1]["int_data"] = buf[1:].view(weights[1]["int_data"].shape).copy_(weights[1]["int_data"])
    multi, single = _copy(weights), _copy(weights)
    multi[1]["int_data"] = buf.clone()[1:].view(weights[1]["int_data"].shape)
    assert multi[1]["int_data"].data_ptr() % 16 != 0
    calls = []
    one = adamw_step_module.adamw_step_triton
    monkeypatch.setattr(adamw_step_module, "adamw_step_triton", lambda **kw: calls.append(kw["seed"]) or one(**kw))
    adamw_step_multi_triton(multi, seed=99, **shared)
    assert calls == [99, 100]
    for t, w in enumerate(single):
        one(**w, **shared, seed=99 + t)
    for t, (a, b) in enumerate(zip(multi, single)):
        for name in a:
            assert torch.equal(a[name], b[name]), (t, name)


def test_multi_dispatcher_takes_the_reference_on_cpu():
    weights, shared = _weights((2, 3), 256, "8bit")
    multi, single = _copy(weights), _copy(weights)
    torch.manual_seed(7)
    adamw_step_multi(multi, **shared)
    torch.manual_seed(7)
    for w in single:
        adamw_step_reference(**w, **shared)
    for a, b in zip(multi, single):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def _bad_multi(change):
    weights, shared = _weights((2, 3), 256, "fp32")
    change(weights, shared)
    return weights, shared


@pytest.mark.parametrize("impl", [adamw_step_multi, adamw_step_multi_triton], ids=["dispatch", "triton"])
@pytest.mark.parametrize("change, error, msg", [
    pytest.param(lambda w, s: w.clear(), ValueError, "no weights", id="empty"),
    pytest.param(lambda w, s: w[1].update(int_data=w[1]["int_data"][:, :128].contiguous(),
                                          grad=w[1]["grad"][:, :128], exp_avg=w[1]["exp_avg"][:, :128].contiguous(),
                                          exp_avg_sq=w[1]["exp_avg_sq"][:, :128].contiguous()),
                 ValueError, "differs from weight 0", id="other-K"),
    pytest.param(lambda w, s: w[1].update(grad=w[1]["grad"].bfloat16()), ValueError, "differs from weight 0",
                 id="other-grad-dtype"),
    pytest.param(lambda w, s: w[0].update(bias=torch.zeros(2)), TypeError, "unknown keys", id="unknown-key"),
    pytest.param(lambda w, s: s.update(noise=torch.zeros(2, 256)), TypeError, "takes no noise", id="noise"),
    pytest.param(lambda w, s: w[0].update(scale=torch.ones(3)), ValueError, "scale must be float32", id="bad-weight"),
])  # fmt: skip
def test_multi_bad_arguments_raise(impl, change, error, msg):
    weights, shared = _bad_multi(change)
    with pytest.raises(error, match=msg):
        impl(weights, seed=1, **shared)


@pytest.mark.gpu
@pytest.mark.parametrize("states", ["bf16", "8bit"])
def test_multi_launch_equals_one_launch_per_weight_on_cuda(states):
    weights, shared = _weights((2048, 1000, 5632), 2048, states, torch.bfloat16)
    weights = [{name: t.cuda() for name, t in w.items()} for w in weights]
    shared = {name: v.cuda() if isinstance(v, torch.Tensor) else v for name, v in shared.items()}
    multi, single = _copy(weights), _copy(weights)
    adamw_step_multi(multi, seed=99, **shared)
    for t, w in enumerate(single):
        adamw_step_triton(**w, **shared, seed=99 + t)
    for a, b in zip(multi, single):
        for name in a:
            assert torch.equal(a[name], b[name]), name
