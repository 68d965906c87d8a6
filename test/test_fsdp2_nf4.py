"""FSDP2 (``fully_shard``) with a frozen NF4 base (QLoRA shape) on CPU: 2 processes, gloo.

Two NF4 Linears (frozen) sit between two trainable plain Linears, so the first one's gradient
crosses the NF4 layers (their input gradient, after FSDP2 re-gathers them for backward); the
sharded run trains and is checked against a single-process run. All scenarios share one spawn (``fsdp_runs``).
"""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from quantframe.api import quantize_
from quantframe.nf4 import NF4Tensor, nf4_weight_only
from quantframe.testing import rank_share, run_distributed, train_mse

WORLD = 2
STEPS = 4
LR = 1e-2
# small blocks so tiny layers shard into whole scaler blocks: 16 * 4 = 64 elements per unit
CONFIG = nf4_weight_only(block_size=16, scaler_block_size=4)
BASE = {2: (64, 32), 4: (64, 64)}  # index in the Sequential -> [out, in] of the NF4 Linears
TRAINABLE = (0, 6)  # plain Linears before (its gradient flows back through NF4) and after the base


def _model(seed: int = 0, shard: bool = False, **fsdp_kwargs) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8))  # fmt: skip
    quantize_(model, CONFIG, filter_fn=lambda m, fqn: fqn in ("2", "4"))
    for i in BASE:  # the whole base is frozen; only the plain Linears train
        model[i].bias.requires_grad_(False)
    if shard:
        for i in (*BASE, *TRAINABLE):
            fully_shard(model[i], **fsdp_kwargs)
        fully_shard(model, **fsdp_kwargs)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return rank_share(torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g))


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=False)


def _train(model: nn.Module, steps: int = STEPS) -> list[float]:
    return train_mse(model, _optimizer(model), *_batch(), steps)


# ---- scenarios: run in each rank ----------------------------------------------------------------
def _scenario_train(rank: int, out: str) -> dict:
    gathered, seen = set(), set()
    pre_all_gather = NF4Tensor.fsdp_pre_all_gather

    def recording_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        inputs, metadata = pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy)
        gathered.add(tuple((t.dtype, tuple(t.shape)) for t in inputs))
        return inputs, metadata

    def record_weight(module, args):
        w = module.weight
        seen.add((type(w).__name__, tuple(w.shape), w.requires_grad))

    NF4Tensor.fsdp_pre_all_gather = recording_pre_all_gather
    try:
        model = _model(shard=True)
        for i in BASE:  # registered after fully_shard's hooks: sees the all-gathered weight
            model[i].register_forward_pre_hook(record_weight)
        before = {i: model[i].weight.to_local().dequantize().clone() for i in BASE}
        losses = _train(model)
    finally:
        NF4Tensor.fsdp_pre_all_gather = pre_all_gather

    shards, full = [], []
    for i in BASE:
        param = model[i].weight
        local = param.to_local()
        shards.append(dict(param=type(param).__name__, local=type(local).__name__, shape=tuple(local.shape),
                           requires_grad=param.requires_grad, codes=local.codes.clone(),
                           unchanged=torch.equal(local.dequantize(), before[i])))  # fmt: skip
        w = param.full_tensor()
        full.append(dict(type=type(w).__name__, shape=tuple(w.shape), codes=w.codes, dequantized=w.dequantize()))
    return dict(losses=losses, gathered=gathered, seen=seen, shards=shards, full=full)


def _scenario_bf16(rank: int, out: str) -> dict:
    """One forward/backward under MixedPrecisionPolicy(param_dtype=bf16)."""
    model = _model(shard=True, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    seen = []
    model[2].register_forward_pre_hook(
        lambda m, args: seen.append((type(m.weight).__name__, m.weight.dtype, m.weight.codes.dtype, args[0].dtype))
    )
    x, y = _batch()
    output = model(x)
    F.mse_loss(output.float(), y).backward()
    grads = [model[i].weight.grad.full_tensor() for i in TRAINABLE]
    return {"seen": seen[0], "output": output.detach(), "grads": grads}


def _scenario_checkpoint(rank: int, out: str) -> dict:
    """dcp.save a sharded model after a step; a fresh model (other seed) dcp.loads it."""
    path = os.path.join(out, "checkpoint")
    model = _model(shard=True)
    _train(model, steps=1)
    opt = _optimizer(model)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    fresh = _model(seed=1, shard=True)
    fresh_opt = _optimizer(fresh)
    x, y = _batch()
    before = F.mse_loss(fresh(x), y).item()
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    result = {"losses": (before, F.mse_loss(fresh(x), y).item(), F.mse_loss(model(x), y).item())}
    for i in BASE:
        saved, loaded = model[i].weight.to_local(), fresh[i].weight.to_local()
        result[f"{i}.type"] = type(loaded).__name__
        pairs = zip(saved._inner_tensors(), loaded._inner_tensors())
        result[f"{i}.same"] = all(torch.equal(a, b) for (_, a), (_, b) in pairs)
    return result


def _scenario_split_scaler_block(rank: int, out: str) -> dict:
    """6 rows x 32 over 2 ranks: 96 elements a shard, not whole 64-element scaler blocks.

    Rank 1's shard starts inside a scaler block: fully_shard's copy into its padded buffer refuses.
    Rank 0's shard starts on one: fully_shard works, the first all-gather refuses.
    """
    model = nn.Sequential(nn.Linear(32, 6))
    quantize_(model, CONFIG)
    with pytest.raises(ValueError, match="whole scaler blocks") as info:
        fully_shard(model)
        model(torch.randn(4, 32))
    return dict(message=str(info.value))


SCENARIOS = {"train": _scenario_train, "bf16": _scenario_bf16, "checkpoint": _scenario_checkpoint,
             "split": _scenario_split_scaler_block}  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    return run_distributed(SCENARIOS, tmp_path_factory.mktemp("fsdp2_nf4"), WORLD)


# ---- tests --------------------------------------------------------------------------------------
def test_sharded_training_matches_single_process(fsdp_runs):
    model = _model()
    ref = torch.tensor(_train(model))
    assert ref[-1] < ref[0] and model[0].weight.grad is None  # zero_grad(set_to_none)
    F.mse_loss(model(_batch()[0]), _batch()[1]).backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[2].weight.grad is None
    for run in fsdp_runs["train"]:
        torch.testing.assert_close(torch.tensor(run["losses"]), ref, rtol=1e-5, atol=1e-6)


def test_local_shards_stay_frozen_nf4_inside_dtensor(fsdp_runs):
    for run in fsdp_runs["train"]:
        for shard, (n, k) in zip(run["shards"], BASE.values()):
            assert (shard["param"], shard["local"]) == ("DTensor", "NF4Tensor")
            assert shard["shape"] == (n // WORLD, k) and not shard["requires_grad"] and shard["unchanged"]
            assert shard["codes"].dtype == torch.uint8 and shard["codes"].shape == (n // WORLD, k // 2)


def test_all_gather_moves_packed_codes_and_int8_scalers(fsdp_runs):
    for run in fsdp_runs["train"]:
        expected = set()
        for n, k in BASE.values():
            rows = n // WORLD
            blocks = rows * k // 16
            expected.add(((torch.uint8, (rows, k // 2)), (torch.int8, (blocks,)), (torch.float32, (blocks // 4,))))
        assert run["gathered"] == expected
        assert run["seen"] == {("NF4Tensor", (n, k), False) for n, k in BASE.values()}


def test_full_tensor_is_the_unsharded_nf4_weight(fsdp_runs):
    ref = _model()
    ranks = fsdp_runs["train"]
    for j, (i, (n, k)) in enumerate(BASE.items()):
        for run in ranks:
            full = run["full"][j]
            assert (full["type"], full["shape"]) == ("NF4Tensor", (n, k))
            assert torch.equal(full["codes"], torch.cat([r["shards"][j]["codes"] for r in ranks]))
            assert torch.equal(full["dequantized"], ref[i].weight.dequantize())


def test_bf16_mixed_precision_gathers_nf4_and_runs_bf16(fsdp_runs):
    # Reference: the same NF4 weights with a bf16 outer dtype, bf16 plain Linears, one process.
    model = _model()
    for i in (*BASE, *TRAINABLE):
        model[i].weight = nn.Parameter(model[i].weight.detach().to(torch.bfloat16), requires_grad=i in TRAINABLE)
        model[i].bias = nn.Parameter(model[i].bias.detach().bfloat16(), requires_grad=i in TRAINABLE)
    x, y = _batch()
    ref_output = model(x.bfloat16())
    F.mse_loss(ref_output.float(), y).backward()
    for rank, run in enumerate(fsdp_runs["bf16"]):
        assert run["seen"] == ("NF4Tensor", torch.bfloat16, torch.uint8, torch.bfloat16)
        assert run["output"].dtype == torch.bfloat16
        torch.testing.assert_close(run["output"], ref_output.detach().chunk(WORLD)[rank], rtol=2e-2, atol=2e-3)
        for i, grad in zip(TRAINABLE, run["grads"]):  # model[0]'s gradient crossed both NF4 layers
            ref_grad = model[i].weight.grad.float()
            assert (grad.float() - ref_grad).norm() < 2e-2 * ref_grad.norm(), i


def test_dcp_checkpoint_restores_nf4_shards_bit_exactly(fsdp_runs):
    for run in fsdp_runs["checkpoint"]:
        before, after, saved = run["losses"]
        assert before != saved and after == saved
        for i in BASE:
            assert run[f"{i}.type"] == "NF4Tensor" and run[f"{i}.same"]


def test_shard_that_splits_a_scaler_block_raises(fsdp_runs):
    rank0, rank1 = (run["message"] for run in fsdp_runs["split"])
    assert rank0 == (
        "NF4Tensor: FSDP2 needs each of the 2 shards of the 6-row weight to hold whole scaler blocks: "
        "rows=6 divisible by 2 and rows/world*in_features=96 a multiple of block_size*scaler_block_size=64; "
        "leave this layer out of quantize_ (filter_fn) or change the sizes"
    )
    assert rank1.startswith(
        "NF4Tensor.copy_: the block layouts differ, (3, 32) with ('block_size', 'scaler_block_size', "
        "'scaler_offset')=[16, 4, 2] into (3, 32) with [16, 4, 0]; under FSDP2 this means a shard does not "
        "hold whole scaler blocks"
    )
