"""FSDP2 (``fully_shard``) with Int8QTLinearWeight on CPU: 2 processes, gloo.

Each scenario runs in 2 spawned ranks (module-level ``_scenario_*`` functions); rank results come
back as plain tensors in files under tmp_path and are checked here against a single-process run.
A spawn costs seconds on 2 cores, so all scenarios share one spawn (``fsdp_runs``); a scenario
that raises fails the spawn, and every test reports the worker's traceback.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from quantframe import (
    Int8QTLinearWeight,
    int8_weight_only_quantized_training,
    quantize_,
)
from quantframe.distributed import count_fsdp_comms
from quantframe.optim import AdamW
from quantframe.testing import run_distributed

WORLD = 2
STEPS = 5
LR = 2e-2
LAYERS = [(32, 16), (16, 32), (8, 16)]  # [out, in] of the MLP's Linears; out divisible by WORLD
LINEARS = (0, 2, 4)  # their indices in the nn.Sequential


# ---- model, data, training: the same code runs single-process (here) and sharded (workers) ----
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def _quantized_mlp(seed: int = 0, shard: bool = False, **fsdp_kwargs) -> nn.Sequential:
    """quantize_, then (shard=True) fully_shard each Linear and the root, as FSDP2 recipes do."""
    model = _mlp(seed)
    quantize_(model, int8_weight_only_quantized_training())
    if shard:
        for i in LINEARS:
            fully_shard(model[i], **fsdp_kwargs)
        fully_shard(model, **fsdp_kwargs)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch, x [16, 16] -> y [16, 8], seen at every step (so the loss must fall);
    sharded, each rank takes its half of the rows."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g)
    if dist.is_initialized():
        return x.chunk(WORLD)[dist.get_rank()], y.chunk(WORLD)[dist.get_rank()]
    return x, y


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x).float(), y)


def _full_batch(loss: torch.Tensor) -> float:
    """The full-batch loss: sharded, the mean of the ranks' equal-sized half-batch losses."""
    loss = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= WORLD
    return loss.item()


def _optimizer(name: str, model: nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    if name == "quantframe":
        return AdamW(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)  # requantizes per in-place op


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    """Per-step full-batch losses, and the first step's weight gradients (full, not sharded)."""
    x, y = _batch()
    losses, first_grads = [], []
    for step in range(steps):
        loss = _loss(model, x, y)
        loss.backward()
        if step == 0:
            grads = [model[i].weight.grad for i in LINEARS]
            first_grads = [g.full_tensor() if isinstance(g, DTensor) else g.clone() for g in grads]
        opt.step()
        opt.zero_grad()
        losses.append(_full_batch(loss))
    return losses, first_grads


# ---- scenarios: run in each rank, return what the tests check ---------------------------------
def _scenario_train(rank: int, out: str) -> dict:
    """Training with both optimizers; records what FSDP2 all-gathers and what forward sees."""
    gathered, seen = set(), set()
    pre_all_gather = Int8QTLinearWeight.fsdp_pre_all_gather

    def recording_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        inputs, metadata = pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy)
        gathered.add(tuple((t.dtype, tuple(t.shape)) for t in inputs))
        return inputs, metadata

    def record_weight(module, args):
        w = module.weight
        seen.add((type(w).__name__, tuple(w.shape), w.dtype, getattr(w, "int_data", w).dtype))

    import quantframe.optim.adamw as adamw_module

    plans, fusable_plain = [], adamw_module._fusable_plain  # called when AdamW plans a parameter's step
    Int8QTLinearWeight.fsdp_pre_all_gather = recording_pre_all_gather
    adamw_module._fusable_plain = lambda *args: plans.append(1) or fusable_plain(*args)
    try:
        model = _quantized_mlp(shard=True)
        for i in LINEARS:  # registered after fully_shard's hooks: sees the all-gathered weight
            model[i].register_forward_pre_hook(record_weight)
        losses, first_grads = _train(model, _optimizer("quantframe", model), STEPS)
    finally:
        Int8QTLinearWeight.fsdp_pre_all_gather = pre_all_gather
        adamw_module._fusable_plain = fusable_plain

    shards, full = [], []
    for i in LINEARS:
        param = model[i].weight
        local = param.to_local()
        shards.append(dict(param=type(param).__name__, local=type(local).__name__, shape=tuple(local.shape),
                           int_data=local.int_data.clone(), scale=local.scale.clone()))  # fmt: skip
        w = param.full_tensor()
        full.append(dict(type=type(w).__name__, shape=tuple(w.shape), int_data=w.int_data, scale=w.scale))

    torch_model = _quantized_mlp(shard=True)
    torch_losses, _ = _train(torch_model, _optimizer("torch", torch_model), STEPS)
    return dict(losses=losses, first_grads=first_grads, gathered=gathered, seen=seen, shards=shards, full=full,
                torch_losses=torch_losses, plans=len(plans), params=len(list(model.parameters())))  # fmt: skip


def _scenario_bf16(rank: int, out: str) -> dict:
    """One step under MixedPrecisionPolicy(param_dtype=bf16)."""
    model = _quantized_mlp(shard=True, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    seen = []
    model[0].register_forward_pre_hook(
        lambda m, args: seen.append(dict(type=type(m.weight).__name__, dtype=m.weight.dtype,
                                         int_data=m.weight.int_data.dtype, input=args[0].dtype))  # fmt: skip
    )
    opt = _optimizer("quantframe", model)
    x, y = _batch()
    output = model(x)
    F.mse_loss(output.float(), y).backward()
    grads = [model[i].weight.grad for i in LINEARS]
    grad_types = {(type(g).__name__, type(g.to_local()).__name__, g.dtype) for g in grads}
    grads = [g.full_tensor() for g in grads]
    opt.step()
    local = model[0].weight.to_local()
    return dict(seen=seen[0], output=output.detach(), grads=grads, grad_types=grad_types,
                after_step=(type(local).__name__, local.int_data.dtype))  # fmt: skip


def _scenario_checkpoint(rank: int, out: str) -> dict:
    """Train 2 steps, dcp.save, go on; a fresh model (other init) dcp.loads and goes on identically."""
    path = os.path.join(out, "checkpoint")
    x, y = _batch()
    model = _quantized_mlp(shard=True)
    opt = _optimizer("quantframe", model)
    _train(model, opt, 2)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    saved = _local_state(model, opt)
    # the next step and the loss after it; the seed fixes the stochastic rounding of the step
    torch.manual_seed(100)
    next_losses = _next_step_losses(model, opt, x, y)

    fresh = _quantized_mlp(seed=1, shard=True)
    fresh_opt = _optimizer("quantframe", fresh)
    fresh_loss = _full_batch(_loss(fresh, x, y))
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded = _local_state(fresh, fresh_opt)
    torch.manual_seed(100)
    resumed_losses = _next_step_losses(fresh, fresh_opt, x, y)
    return dict(saved=saved, loaded=loaded, next_losses=next_losses, resumed_losses=resumed_losses,
                fresh_loss=fresh_loss)  # fmt: skip


def _local_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Clones of this rank's shards: int_data/scale of each weight, biases, optimizer state."""
    state = {}
    for i in LINEARS:
        w = model[i].weight.to_local()
        state[f"{i}.weight.type"] = type(w).__name__
        state[f"{i}.weight.int_data"], state[f"{i}.weight.scale"] = w.int_data.clone(), w.scale.clone()
        state[f"{i}.bias"] = model[i].bias.to_local().clone()
        for name, value in opt.state[model[i].weight].items():
            state[f"{i}.weight.{name}"] = (value.to_local() if isinstance(value, DTensor) else value).clone()
    return state


def _next_step_losses(model, opt, x, y) -> tuple[float, float]:
    loss = _loss(model, x, y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return _full_batch(loss), _full_batch(_loss(model, x, y))


BYTES_DIM = 256  # two Linear(256, 256, bias=False): the scales' share of the bytes is 4 / 256


def _scenario_bytes(rank: int, out: str) -> dict:
    """Bytes each rank hands to FSDP2's all-gathers and reduce-scatters in one training step, for
    the same model with bf16 weights and with INT8 weights, both under a bf16 MixedPrecisionPolicy."""
    result = {}
    for name, quantized in (("bf16", False), ("int8", True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(BYTES_DIM, BYTES_DIM, bias=False), nn.ReLU(),
                              nn.Linear(BYTES_DIM, BYTES_DIM, bias=False))  # fmt: skip
        if quantized:
            quantize_(model, int8_weight_only_quantized_training())
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        for i in (0, 2):
            fully_shard(model[i], mp_policy=mp_policy)
        fully_shard(model, mp_policy=mp_policy)
        counts = count_fsdp_comms(model)
        model(torch.randn(4, BYTES_DIM)).float().square().mean().backward()
        result[name] = dict(all_gather=counts.all_gather_bytes, calls=counts.all_gather_calls,
                            dtypes=sorted(map(str, counts.all_gather_dtypes)),
                            reduce_scatter=counts.reduce_scatter_bytes)  # fmt: skip
    return result


def _scenario_uneven(rank: int, out: str) -> dict:
    """out_features=15 over 2 ranks: fully_shard pads, the first all-gather must refuse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 15))
    quantize_(model, int8_weight_only_quantized_training())
    fully_shard(model)
    with pytest.raises(ValueError, match="out_features=15 divisible by the shard world size 2") as info:
        model(torch.randn(4, 16))
    return dict(message=str(info.value))


SCENARIOS = {"train": _scenario_train, "bf16": _scenario_bf16, "checkpoint": _scenario_checkpoint,
             "uneven": _scenario_uneven, "bytes": _scenario_bytes}  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """{scenario: [rank 0 result, rank 1 result]}; an exception on any rank fails every test."""
    return run_distributed(SCENARIOS, tmp_path_factory.mktemp("fsdp2"), WORLD)


def _single_process(optimizer: str, lr: float = LR) -> tuple[list[float], list[torch.Tensor]]:
    model = _quantized_mlp()
    return _train(model, _optimizer(optimizer, model, lr), STEPS)


# ---- tests -------------------------------------------------------------------------------------
def test_sharded_training_matches_single_process(fsdp_runs):
    run = fsdp_runs["train"][0]
    ref_losses, ref_grads = _single_process("quantframe")
    losses, ref_losses = torch.tensor(run["losses"]), torch.tensor(ref_losses)
    # Step 1 starts from the same round-to-nearest weights: equal up to fp summation order.
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=0, atol=1e-6)
    for grad, ref_grad in zip(run["first_grads"], ref_grads):  # reduce-scatter averages the halves
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # Later steps: stochastic rounding draws differ between runs (~0.3% apart over seeds here);
    # a 20% larger learning rate moves the losses 2-5%, and fails this tolerance.
    torch.testing.assert_close(losses, ref_losses, rtol=1e-2, atol=0)
    off_losses = torch.tensor(_single_process("quantframe", lr=1.2 * LR)[0])
    assert not torch.allclose(off_losses, ref_losses, rtol=1e-2, atol=0)
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses


def test_adamw_plans_each_sharded_parameter_once(fsdp_runs):
    # Parameter(DTensor).to_local() returns a new wrapper each call; the optimizer's step plans key
    # on the DTensor's own local tensor, so they are made once, not every step.
    for run in fsdp_runs["train"]:
        assert run["plans"] == run["params"], (run["plans"], run["params"], STEPS)


def test_torch_adamw_trains_sharded_quantized_model(fsdp_runs):
    losses = torch.tensor(fsdp_runs["train"][0]["torch_losses"])
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    torch.testing.assert_close(losses, torch.tensor(_single_process("torch")[0]), rtol=1e-2, atol=0)


def test_local_shards_stay_int8_inside_dtensor(fsdp_runs):
    for run in fsdp_runs["train"]:
        for shard, (out_features, in_features) in zip(run["shards"], LAYERS):
            assert (shard["param"], shard["local"]) == ("DTensor", "Int8QTLinearWeight")
            assert shard["shape"] == (out_features // WORLD, in_features)
            assert shard["int_data"].dtype == torch.int8
            assert shard["int_data"].shape == (out_features // WORLD, in_features)
            assert shard["scale"].shape == (out_features // WORLD,)


def test_full_tensor_is_the_concatenated_int8_shards(fsdp_runs):
    ranks = fsdp_runs["train"]
    for i, (out_features, in_features) in enumerate(LAYERS):
        shards = [run["shards"][i] for run in ranks]
        for run in ranks:
            full = run["full"][i]
            assert (full["type"], full["shape"]) == ("Int8QTLinearWeight", (out_features, in_features))
            torch.testing.assert_close(full["int_data"], torch.cat([s["int_data"] for s in shards]), rtol=0, atol=0)
            torch.testing.assert_close(full["scale"], torch.cat([s["scale"] for s in shards]), rtol=0, atol=0)


def test_all_gather_moves_int8_and_scales(fsdp_runs):
    for run in fsdp_runs["train"]:
        # what fsdp_pre_all_gather hands to the all-gather: int8 rows + fp32 row scales of the shard
        assert run["gathered"] == {((torch.int8, (n // WORLD, k)), (torch.float32, (n // WORLD,))) for n, k in LAYERS}
        # what each Linear's forward gets back: the full Int8QTLinearWeight, not a float weight
        assert run["seen"] == {("Int8QTLinearWeight", (n, k), torch.float32, torch.int8) for n, k in LAYERS}


def test_bf16_mixed_precision_gathers_int8_and_runs_bf16(fsdp_runs):
    # Reference: plain torch in bf16 on the same first weights, dequantized. (fp32 is no reference:
    # bf16 flips ReLUs near 0 and moves the first layer's gradient by ~10% in plain torch too.)
    model = _quantized_mlp()
    for i in LINEARS:
        model[i].weight = nn.Parameter(model[i].weight.dequantize(torch.bfloat16))
        model[i].bias = nn.Parameter(model[i].bias.detach().bfloat16())
    x, y = _batch()
    ref_output = model(x.bfloat16())
    F.mse_loss(ref_output.float(), y).backward()
    for rank, run in enumerate(fsdp_runs["bf16"]):
        assert run["seen"] == dict(type="Int8QTLinearWeight", dtype=torch.bfloat16, int_data=torch.int8,
                                   input=torch.bfloat16)  # fmt: skip
        assert run["grad_types"] == {("DTensor", "Tensor", torch.float32)}  # reduced, then cast to fp32
        assert run["after_step"] == ("Int8QTLinearWeight", torch.int8)
        torch.testing.assert_close(run["output"], ref_output.detach().chunk(WORLD)[rank], rtol=2e-2, atol=2e-3)
        for i, grad in zip(LINEARS, run["grads"]):
            ref_grad = model[i].weight.grad.float()
            assert (grad - ref_grad).norm() < 2e-2 * ref_grad.norm(), i


def test_dcp_checkpoint_resumes_exactly(fsdp_runs):
    for run in fsdp_runs["checkpoint"]:
        assert run["fresh_loss"] != run["next_losses"][0]  # the fresh model starts elsewhere
        saved, loaded = run["saved"], run["loaded"]
        assert saved.keys() == loaded.keys()
        types = {f"{i}.weight.type": "Int8QTLinearWeight" for i in LINEARS}
        assert {name: saved.pop(name) for name in types} == {name: loaded.pop(name) for name in types} == types
        for name, tensor in saved.items():  # int_data/scale, biases, AdamW state: bit-identical
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        # same loss before the next step and, with the same rounding draws, after it
        assert run["resumed_losses"] == run["next_losses"]


def test_uneven_shard_raises(fsdp_runs):
    for run in fsdp_runs["uneven"]:
        assert run["message"] == (
            "Int8QTLinearWeight: FSDP2 needs out_features=15 divisible by the shard world size 2; "
            "leave this layer out of quantize_ (filter_fn) or pad it"
        )


def test_all_gather_bytes_int8_are_half_of_bf16(fsdp_runs):
    rows = BYTES_DIM // WORLD  # each rank's shard of a [256, 256] weight
    for run in fsdp_runs["bytes"]:
        bf16, int8 = run["bf16"], run["int8"]
        # one all-gather per Linear in the forward, one again in the backward (resharded after forward)
        assert bf16["calls"] == int8["calls"] == 4
        assert bf16["dtypes"] == ["torch.bfloat16"]  # cast to the policy's dtype, then gathered
        assert int8["dtypes"] == ["torch.uint8"]  # int8 rows + fp32 scales, gathered as bytes
        assert bf16["all_gather"] == 4 * rows * BYTES_DIM * 2
        assert int8["all_gather"] == 4 * (rows * BYTES_DIM + rows * 4)
        assert int8["all_gather"] / bf16["all_gather"] == pytest.approx(0.5 + 2 / BYTES_DIM)  # 0.508
        # gradients are dense bf16 in both: INT8 weights do not shrink the reduce-scatter
        assert int8["reduce_scatter"] == bf16["reduce_scatter"] == 2 * BYTES_DIM * BYTES_DIM * 2


@pytest.mark.parametrize("cls_name", ["Int8QTLinearWeight", "NF4Tensor", "Int8MixedPrecisionQTLinearWeight",
                                      "Int8MixedPrecisionLinearWeight", "BitNetTrainingLinearWeight"])  # fmt: skip
def test_pre_all_gather_signature_is_stored(cls_name, monkeypatch):
    # FSDP2 calls inspect.signature on the bound hook at every all-gather of every parameter and
    # needs 5 parameters; the bound hook's signature is stored on its type, so inspect returns it
    # without a parse or a copy (a bound method would be copied without `self` at every call).
    import inspect

    import quantframe

    cls = getattr(quantframe, cls_name)
    weight = cls.from_float(torch.randn(64, 256))
    bound = weight.fsdp_pre_all_gather
    assert list(inspect.signature(bound).parameters) == ["mesh", "outer_size", "outer_stride", "module", "mp_policy"]
    assert inspect.signature(bound) is type(bound).__signature__
    assert list(inspect.signature(cls.fsdp_pre_all_gather).parameters)[0] == "self"
    # no signature work per call: a bound method's path (which copies the signature) must not run
    monkeypatch.setattr(inspect, "_signature_bound_method", lambda sig: pytest.fail("signature copied"))
    inspect.signature(weight.fsdp_pre_all_gather)

    class Mesh:  # what the hook reads of a DeviceMesh
        def size(self):
            return 1

    # called bound (as FSDP2 does) or through the class (as the tests' recording hooks do): the same inputs
    (a, _), (b, _) = bound(Mesh()), cls.fsdp_pre_all_gather(weight, Mesh())
    assert [t.data_ptr() for t in a] == [t.data_ptr() for t in b] and len(a) == 1  # world 1: the first input
