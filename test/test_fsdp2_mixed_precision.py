"""FSDP2 (``fully_shard``) with INT8 mixed-precision weights on CPU: 2 processes, gloo.

Same pattern as test_fsdp2.py: every scenario runs in one spawn of 2 ranks (``mixed_runs``);
rank results come back as plain tensors in files and are checked here against single-process
runs. The single-process reference runs the ranks' half-batches one after the other and sums
their gradients: INT8 quantization over tokens (the weight gradient's column scales) then sees
the same tokens as each rank does, so float-weight training must match it to float rounding.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from quantframe.int8_mixed_precision import (
    Int8MixedPrecisionLinearWeight,
    Int8MixedPrecisionQTLinearWeight,
    int8_mixed_precision_training,
)
from quantframe.optim import AdamW
from quantframe.testing import FSDP_MLP_LINEARS, fsdp_batch_halves, fsdp_mlp, run_distributed

WORLD = 2
STEPS = 5
LR = 2e-2
LINEARS = FSDP_MLP_LINEARS  # the Linears' indices in the nn.Sequential
CLASSES = {False: Int8MixedPrecisionLinearWeight, True: Int8MixedPrecisionQTLinearWeight}


def _mlp(int8_weights: bool, out_features: int = 8, shard: bool = False, **fsdp_kwargs) -> nn.Sequential:
    return fsdp_mlp(int8_mixed_precision_training(int8_weights=int8_weights), out_features, shard, 0, **fsdp_kwargs)


def _halves(out_features: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return fsdp_batch_halves(WORLD, out_features)


def _train(model: nn.Module, steps: int = STEPS, out_features: int = 8) -> tuple[list[float], list[torch.Tensor]]:
    """Per-step full-batch losses and the first step's full weight gradients.

    Sharded: each rank trains on its half. Single process: both halves in turn, gradients summed.
    """
    sharded = dist.is_initialized()
    halves = [_halves(out_features)[dist.get_rank()]] if sharded else _halves(out_features)
    opt = AdamW(model.parameters(), lr=LR)
    losses, first_grads = [], []
    for step in range(steps):
        loss = torch.zeros(())
        for x, y in halves:  # sharded, FSDP2's reduce-scatter averages the ranks' gradients
            half_loss = F.mse_loss(model(x).float(), y) / len(halves)
            half_loss.backward()
            loss += half_loss.detach()
        if sharded:
            dist.all_reduce(loss)
            loss /= WORLD
        if step == 0:
            grads = [model[i].weight.grad for i in LINEARS]
            first_grads = [g.full_tensor() if isinstance(g, DTensor) else g.clone() for g in grads]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, first_grads


# ---- scenarios: run in each rank ---------------------------------------------------------------
def _recording(cls, gathered: set):
    pre_all_gather = cls.fsdp_pre_all_gather

    def recording_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        inputs, metadata = pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy)
        gathered.add(tuple((t.dtype, tuple(t.shape)) for t in inputs))
        return inputs, metadata

    return pre_all_gather, recording_pre_all_gather


def _scenario_train(rank: int, out: str) -> dict:
    results = {}
    for int8_weights, cls in CLASSES.items():
        gathered, seen = set(), set()
        original, cls.fsdp_pre_all_gather = _recording(cls, gathered)
        try:
            model = _mlp(int8_weights, shard=True)
            for i in LINEARS:  # after fully_shard's hooks: sees the all-gathered weight
                model[i].register_forward_pre_hook(
                    lambda m, args: seen.add((type(m.weight).__name__, tuple(m.weight.shape), m.weight.output))
                )
            losses, first_grads = _train(model)
        finally:
            cls.fsdp_pre_all_gather = original
        local = [model[i].weight.to_local() for i in LINEARS]
        full = model[0].weight.full_tensor()
        results[int8_weights] = dict(
            losses=losses, first_grads=first_grads, gathered=gathered, seen=seen,
            local=[(type(model[i].weight).__name__, type(t).__name__, tuple(t.shape)) for i, t in zip(LINEARS, local)],
            full=(type(full).__name__, full.dequantize()), shard0=local[0].dequantize(),
        )  # fmt: skip
    return results


def _scenario_bf16(rank: int, out: str) -> dict:
    gathered, seen = set(), []
    cls = Int8MixedPrecisionLinearWeight
    original, cls.fsdp_pre_all_gather = _recording(cls, gathered)
    try:
        model = _mlp(False, shard=True, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        model[0].register_forward_pre_hook(
            lambda m, args: seen.append((type(m.weight).__name__, m.weight.dtype, m.weight.float_data.dtype,
                                         args[0].dtype))  # fmt: skip
        )
        x, y = _halves()[rank]
        output = model(x)
        F.mse_loss(output.float(), y).backward()
    finally:
        cls.fsdp_pre_all_gather = original
    grads = [model[i].weight.grad for i in LINEARS]
    return dict(gathered=gathered, seen=seen[0], output=output.detach(), grad_dtypes={g.dtype for g in grads},
                master=model[0].weight.to_local().float_data.dtype)  # fmt: skip


def _scenario_uneven(rank: int, out: str) -> dict:
    """out_features=15 over 2 ranks: float weights are padded for the all-gather; int8 weights refuse."""
    losses, first_grads = _train(_mlp(False, out_features=15, shard=True), steps=2, out_features=15)
    model = _mlp(True, out_features=15, shard=True)
    with pytest.raises(ValueError, match="out_features=15 divisible by the shard world size 2") as info:
        model(torch.randn(4, 16))
    return dict(losses=losses, first_grads=first_grads, int8_message=str(info.value))


SCENARIOS = {"train": _scenario_train, "bf16": _scenario_bf16, "uneven": _scenario_uneven}


@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """{scenario: [rank 0 result, rank 1 result]}; an exception on any rank fails every test."""
    return run_distributed(SCENARIOS, tmp_path_factory.mktemp("fsdp2_mixed"), WORLD)


# ---- tests -------------------------------------------------------------------------------------
def test_sharded_float_weight_training_matches_single_process(mixed_runs):
    run = mixed_runs["train"][0][False]
    ref_losses, ref_grads = _train(_mlp(False))
    for grad, ref_grad in zip(run["first_grads"], ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # No stochastic rounding anywhere: the same run up to float summation order, every step.
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    assert run["losses"][-1] < 0.8 * run["losses"][0]


def test_sharded_int8_weight_training_matches_single_process(mixed_runs):
    run = mixed_runs["train"][0][True]
    ref_losses, ref_grads = _train(_mlp(True))
    for grad, ref_grad in zip(run["first_grads"], ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    losses, ref_losses = torch.tensor(run["losses"]), torch.tensor(ref_losses)
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=1e-6, atol=0)
    # later steps: the optimizer's stochastic rounding draws differently in each run
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=0)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("int8_weights", [False, True], ids=["float", "int8"])
def test_shards_all_gather_and_forward_keep_the_format(mixed_runs, int8_weights):
    cls = CLASSES[int8_weights].__name__
    layers = [(32, 16), (16, 32), (8, 16)]
    for run in (ranks[int8_weights] for ranks in mixed_runs["train"]):
        assert run["local"] == [("DTensor", cls, (n // WORLD, k)) for n, k in layers]
        assert run["seen"] == {(cls, (n, k), True) for n, k in layers}  # the full weight, flags kept
        if int8_weights:  # int8 rows + fp32 row scales
            expected = {((torch.int8, (n // WORLD, k)), (torch.float32, (n // WORLD,))) for n, k in layers}
            assert run["gathered"] == expected
        else:  # the float weight, nothing else
            assert run["gathered"] == {((torch.float32, (n // WORLD, k)),) for n, k in layers}
    full_type, full = mixed_runs["train"][0][int8_weights]["full"]
    assert full_type == cls
    torch.testing.assert_close(full, torch.cat([ranks[int8_weights]["shard0"] for ranks in mixed_runs["train"]]))


def test_bf16_param_dtype_gathers_bf16_and_keeps_fp32_master(mixed_runs):
    model = _mlp(False)
    for rank, run in enumerate(mixed_runs["bf16"]):
        assert run["gathered"] == {((torch.bfloat16, (n // WORLD, k)),) for n, k in [(32, 16), (16, 32), (8, 16)]}
        assert run["seen"] == ("Int8MixedPrecisionLinearWeight", torch.bfloat16, torch.bfloat16, torch.bfloat16)
        assert run["master"] == torch.float32 and run["grad_dtypes"] == {torch.float32}
        ref = model(_halves()[rank][0]).detach()
        assert (run["output"].float() - ref).norm() < 3e-2 * ref.norm()


def test_uneven_shards(mixed_runs):
    ref_losses, ref_grads = _train(_mlp(False, out_features=15), steps=2, out_features=15)
    for run in mixed_runs["uneven"]:
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses), rtol=1e-4, atol=0)
        for grad, ref_grad in zip(run["first_grads"], ref_grads):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
        assert run["int8_message"] == (
            "Int8MixedPrecisionQTLinearWeight: FSDP2 needs out_features=15 divisible by the shard world size 2; "
            "leave this layer out of quantize_ (filter_fn) or pad it"
        )
