"""FSDP2 (``fully_shard``) over ``DoRALinear`` layers on CPU: 2 processes, gloo.

Two DoRALinears (a bf16 float base, an NF4 base) sit between two trainable plain Linears; each
DoRALinear is its own FSDP unit, so its frozen base, bias, ``lora_A``, ``lora_B`` and
``magnitude`` are sharded together (rows of the base and B, the magnitude's entries). The sharded
run's losses are checked against a single-process run. All scenarios share one spawn.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from quantframe.nf4 import NF4Tensor, nf4_weight_only
from quantframe.nn.dora import DoRALinear, apply_adapters_, dora, lora
from quantframe.testing import rank_share, run_distributed, train_mse

WORLD = 2
STEPS = 4
LR = 1e-2
# small NF4 blocks so a tiny layer shards into whole scaler blocks: 16 * 4 = 64 elements per unit
NF4 = nf4_weight_only(block_size=16, scaler_block_size=4)
ADAPTED = (2, 4)  # indices of the DoRALinears in the Sequential: [64, 32] bf16 base, [64, 64] NF4 base
TRAINABLE = (0, 6)  # plain Linears before (its gradient crosses both DoRA layers) and after


def _model(use_dora: bool = True, seed: int = 0, shard: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8))  # fmt: skip
    make = dora if use_dora else lora
    model[2].to(torch.bfloat16)  # a bf16 dense base (adapters stay fp32)
    apply_adapters_(model, make(rank=4, alpha=8), filter_fn=lambda m, fqn: fqn == "2")
    apply_adapters_(model, make(rank=4, alpha=8, base=NF4), filter_fn=lambda m, fqn: fqn == "4")
    with torch.no_grad():  # B != 0, so the adapters (and the norm) take part from the first step
        for i in ADAPTED:
            model[i].lora_B.normal_(std=0.05)
    if shard:
        for i in (*ADAPTED, *TRAINABLE):
            fully_shard(model[i])
        fully_shard(model)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return rank_share(torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g))


def _train(model: nn.Module, steps: int = STEPS) -> list[float]:
    return train_mse(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=False), *_batch(), steps)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ---- scenarios: run in each rank ----------------------------------------------------------------
def _scenario(use_dora: bool, rank: int) -> dict:
    model = _model(use_dora, shard=True)
    before = {i: _local(model[i].weight).dequantize().clone() if i == 4 else _local(model[i].weight).clone()
              for i in ADAPTED}  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model)
    # a view output would let an in-place op drop FSDP2's pre-backward hook (FSDP2 warns)
    views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
    result = {"losses": losses, "shards": [], "merged": [], "view_warnings": views}
    for i in ADAPTED:
        w = _local(model[i].weight)
        now = w.dequantize() if isinstance(w, NF4Tensor) else w
        result["shards"].append({
            "param": type(model[i].weight).__name__, "local": type(w).__name__, "shape": tuple(w.shape),
            "dtype": w.dtype, "requires_grad": model[i].weight.requires_grad, "unchanged": torch.equal(now, before[i]),
        })  # fmt: skip
        result["merged"].append(model[i].merge())  # full [N, K] weight, gathered from the shards
    return result


def _scenario_dora(rank: int, out: str) -> dict:
    return _scenario(True, rank)


def _scenario_lora(rank: int, out: str) -> dict:
    return _scenario(False, rank)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    scenarios = {"dora": _scenario_dora, "lora": _scenario_lora}
    return run_distributed(scenarios, tmp_path_factory.mktemp("fsdp2_dora"), WORLD)


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_sharded_training_matches_single_process(fsdp_runs, use_dora):
    model = _model(use_dora)
    ref = torch.tensor(_train(model))
    assert ref[-1] < ref[0]
    for run in fsdp_runs["dora" if use_dora else "lora"]:
        torch.testing.assert_close(torch.tensor(run["losses"]), ref, rtol=1e-4, atol=1e-6)
    for j, i in enumerate(ADAPTED):  # the sharded adapters moved as the single-process ones did
        for run in fsdp_runs["dora" if use_dora else "lora"]:
            torch.testing.assert_close(run["merged"][j], model[i].merge(), rtol=1e-4, atol=1e-5)


def test_frozen_bases_are_sharded_by_rows_and_stay_unchanged(fsdp_runs):
    for run in fsdp_runs["dora"]:
        (bf16, nf4) = run["shards"]
        assert (bf16["param"], bf16["local"], bf16["dtype"]) == ("DTensor", "Tensor", torch.bfloat16)
        assert (nf4["param"], nf4["local"]) == ("DTensor", "NF4Tensor")
        assert bf16["shape"] == (64 // WORLD, 32) and nf4["shape"] == (64 // WORLD, 64)
        for shard in (bf16, nf4):
            assert not shard["requires_grad"] and shard["unchanged"]
        assert run["view_warnings"] == []  # DoRALinear's output is not a view


def test_single_process_reference_is_a_dora_model():
    model = _model()
    assert isinstance(model[2], DoRALinear) and model[2].weight.dtype == torch.bfloat16
    assert isinstance(model[4], DoRALinear) and isinstance(model[4].weight, NF4Tensor)
