"""Layers over quantized bases: DoRA / LoRA adapters (``DoRALinear``) and their module swaps."""

from quantframe.nn.dora import DoRAConfig, DoRALinear, apply_adapters_, dora, lora, merge_adapters_

__all__ = ["DoRAConfig", "DoRALinear", "apply_adapters_", "dora", "lora", "merge_adapters_"]
