"""FSDP2 on one rank (``fully_shard`` with a world of 1: one GPU, or a 1-process torchrun).

There FSDP2 (torch 2.11-2.13) skips the all-gather and copies only the first all-gather input of a
weight into the unsharded parameter; INT8 and NF4 weights all-gather several tensors (codes and
scales), which used to fail (``not enough values to unpack``). Each scenario trains the sharded
model in one spawned gloo process and is compared with the same training unsharded.
"""

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from quantframe import int8_weight_only_quantized_training, quantize_
from quantframe.nf4 import NF4Tensor, nf4_weight_only
from quantframe.optim import AdamW
from quantframe.testing import fsdp_mlp, run_distributed, train_mse

STEPS = 4


def _batch(out_features: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 16, generator=g), torch.randn(16, out_features, generator=g)


def _int8_losses(shard: bool) -> list[float]:
    model = fsdp_mlp(int8_weight_only_quantized_training(), shard=shard)
    return train_mse(model, AdamW(model.parameters(), lr=2e-2), *_batch(), STEPS)


def _nf4_model(shard: bool) -> nn.Sequential:
    """Plain Linears around a frozen NF4 one (small blocks: 16 x 4 elements a scaler block)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_(model, nf4_weight_only(block_size=16, scaler_block_size=4), filter_fn=lambda m, fqn: fqn == "2")
    model[2].bias.requires_grad_(False)
    if shard:
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
    return model


def _nf4_losses(shard: bool) -> list[float]:
    model = _nf4_model(shard)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    return train_mse(model, opt, *_batch(), STEPS)


def _scenario_int8(rank: int, out: str) -> dict:
    return dict(losses=_int8_losses(shard=True))


def _scenario_nf4(rank: int, out: str) -> dict:
    losses = _nf4_losses(shard=True)
    local = _nf4_model(shard=True)[2].weight.to_local()
    return dict(losses=losses, local=type(local).__name__)


SCENARIOS = {"int8": _scenario_int8, "nf4": _scenario_nf4}


def test_one_rank_fsdp2_trains_int8_and_nf4_weights_as_unsharded(tmp_path):
    runs = run_distributed(SCENARIOS, tmp_path, world=1)
    int8, ref = torch.tensor(runs["int8"][0]["losses"]), torch.tensor(_int8_losses(shard=False))
    torch.testing.assert_close(int8[0], ref[0], rtol=0, atol=1e-6)  # the same round-to-nearest start
    torch.testing.assert_close(int8, ref, rtol=1e-2, atol=0)  # stochastic rounding: draws may differ
    assert int8[-1] < 0.8 * int8[0], int8
    nf4 = runs["nf4"][0]
    assert nf4["local"] == NF4Tensor.__name__
    torch.testing.assert_close(torch.tensor(nf4["losses"]), torch.tensor(_nf4_losses(shard=False)), rtol=1e-5, atol=0)
