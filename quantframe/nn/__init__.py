"""Layers: DoRA / LoRA adapters over quantized bases (``DoRALinear``) and their module swaps;
BitNet b1.58 layers (``BitLinear``, ``FusedBitLinear``)."""

from quantframe.nn.bitlinear import BitLinear, FusedBitLinear
from quantframe.nn.dora import DoRAConfig, DoRALinear, apply_adapters_, dora, lora, merge_adapters_

__all__ = [
    "BitLinear",
    "DoRAConfig",
    "DoRALinear",
    "FusedBitLinear",
    "apply_adapters_",
    "dora",
    "lora",
    "merge_adapters_",
]
