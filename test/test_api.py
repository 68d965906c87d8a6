import logging
from dataclasses import dataclass

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

from quantframe import (
    Int8QTLinearWeight,
    QuantConfig,
    SkipModule,
    int8_weight_only_quantized_training,
    quantize_,
    register_quantize_handler,
    summary,
)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))


def test_quantize_swaps_weights_in_place_and_returns_none():
    m = mlp()
    m[0].weight.requires_grad_(False)
    assert quantize_(m, int8_weight_only_quantized_training()) is None
    for lin, grad in ((m[0], False), (m[2], True)):
        assert isinstance(lin.weight, nn.Parameter) and isinstance(lin.weight, Int8QTLinearWeight)
        assert lin.weight.requires_grad is grad
    assert type(m[0].bias) is nn.Parameter  # biases stay dense


def test_filter_fn_selects_modules_by_name():
    m = mlp()
    quantize_(m, int8_weight_only_quantized_training(), filter_fn=lambda mod, fqn: fqn == "2")
    assert type(m[0].weight) is nn.Parameter and isinstance(m[2].weight, Int8QTLinearWeight)


def test_tied_weights_stay_tied():
    emb_out = nn.Linear(16, 32)
    m = nn.ModuleDict({"a": emb_out, "b": nn.Linear(16, 32)})
    m["b"].weight = m["a"].weight
    quantize_(m, int8_weight_only_quantized_training())
    assert m["a"].weight is m["b"].weight and isinstance(m["a"].weight, Int8QTLinearWeight)
    assert "tied to Int8QTLinearWeight" in summary(m)


def test_quantizing_twice_raises():
    m = mlp()
    quantize_(m, int8_weight_only_quantized_training())
    with pytest.raises(ValueError, match=r"0\.weight is already a Int8QTLinearWeight; quantize_ was already applied"):
        quantize_(m, int8_weight_only_quantized_training())


def test_filter_fn_selecting_a_module_without_weight_raises():
    with pytest.raises(ValueError, match=r"filter_fn selected 1 \(ReLU\), which has no weight tensor"):
        quantize_(mlp(), int8_weight_only_quantized_training(), filter_fn=lambda mod, fqn: fqn == "1")


def test_filter_fn_selecting_a_non_2d_weight_raises():
    m = nn.Sequential(nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"weight must be 2-D .* got shape \(8,\)"):
        quantize_(m, int8_weight_only_quantized_training(), filter_fn=lambda mod, fqn: fqn == "0")


def test_bad_model_and_unregistered_config_raise():
    with pytest.raises(TypeError, match="expects an nn.Module, got Tensor"):
        quantize_(torch.zeros(2), int8_weight_only_quantized_training())

    @dataclass(frozen=True)
    class Unknown(QuantConfig):
        pass

    with pytest.raises(TypeError, match=r"no handler for config .*Unknown\(\); registered configs: .*Int8WeightOnlyQuantizedTrainingConfig"):
        quantize_(mlp(), Unknown())
    with pytest.raises(TypeError, match="expects a QuantConfig subclass"):
        register_quantize_handler(int)


@dataclass(frozen=True)
class _EvenRowsOnly(QuantConfig):
    """A test scheme: int8 QT for layers with an even number of input features, skip the rest."""


@register_quantize_handler(_EvenRowsOnly)
def _even_rows_only(module, config):
    if module.in_features % 2:
        raise SkipModule(f"in_features={module.in_features} is odd")
    return Int8QTLinearWeight.from_float(module.weight)


def test_skipped_modules_are_logged_and_listed(caplog):
    m = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 7), nn.Linear(7, 4))
    with caplog.at_level(logging.INFO, logger="quantframe"):
        quantize_(m, _EvenRowsOnly())
    assert type(m[2].weight) is nn.Parameter
    assert "quantized 2 weights, skipped 1" in caplog.text and "skipped 2: in_features=7 is odd" in caplog.text
    assert_expected_inline(
        summary(m),
        """\
name      format              shape  bytes
--------  ------------------  -----  -----
0.weight  Int8QTLinearWeight  8x16   160 B
1.weight  Int8QTLinearWeight  7x8    84 B
quantized: 244 B   dense parameters: 188 B
skipped 2: in_features=7 is odd""",
    )


def test_weight_tied_to_an_unselected_module_stays_dense_and_tied():
    m = nn.ModuleDict({"emb": nn.Embedding(32, 16), "head": nn.Linear(16, 32, bias=False)})
    m["head"].weight = m["emb"].weight
    quantize_(m, int8_weight_only_quantized_training())
    assert m["head"].weight is m["emb"].weight and type(m["head"].weight) is nn.Parameter
    assert "skipped head: weight is tied to emb.weight, which is not selected" in summary(m)


def test_quantize_after_fully_shard_raises():
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        lin = nn.Linear(8, 8)
        lin.weight = nn.Parameter(DTensor.from_local(lin.weight.detach(), mesh, [Replicate()]))
        with pytest.raises(ValueError, match="weight is a DTensor; call quantize_ before fully_shard"):
            quantize_(nn.Sequential(lin), int8_weight_only_quantized_training())
    finally:
        dist.destroy_process_group()
