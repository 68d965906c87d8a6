"""Optimizers that know about quantized weights, and 8-bit optimizer states."""

from quantframe.optim.adamw import AdamW, AdamW8bit
from quantframe.optim.state8bit import OptimState8bit, create_dynamic_map

__all__ = ["AdamW", "AdamW8bit", "OptimState8bit", "create_dynamic_map"]
