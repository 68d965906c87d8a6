"""Optimizers that know about quantized weights."""

from quantframe.optim.adamw import AdamW

__all__ = ["AdamW"]
