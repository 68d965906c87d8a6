"""AdamW that updates quantized weights with one dequantize and one requantize per step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quantframe.primitives import fp32_to_bf16_stochastic
from quantframe.tensor import QuantTensor

__all__ = ["AdamW"]


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter or state), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamW(torch.optim.Optimizer):
    """Drop-in for ``torch.optim.AdamW`` (same arguments, same math for plain parameters).

    All math is fp32 and the moments are fp32, whatever the parameter dtype. A quantized
    parameter (any :class:`~quantframe.QuantTensor` with ``requantize_``) is dequantized once,
    updated in fp32 and written back once with stochastic rounding — torch's AdamW would
    requantize after each of its in-place ops. With ``bf16_stochastic_round=True``, bf16
    parameters are written back with stochastic rounding too (pure-bf16 training without an
    fp32 master copy). Works on FSDP2 (DTensor) parameters: rows are whole on each shard, so
    the per-shard update equals the unsharded one.

    Example::

        quantize_(model, int8_weight_only_quantized_training())
        opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        bf16_stochastic_round: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: invalid betas {betas}; each must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: invalid weight_decay {weight_decay}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, bf16_stochastic_round=bf16_stochastic_round,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        zeros = lambda: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)  # noqa: E731
        state = {"step": torch.tensor(0.0), "exp_avg": zeros(), "exp_avg_sq": zeros()}
        if amsgrad:
            state["max_exp_avg_sq"] = zeros()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group["amsgrad"]))
                self._update(p, state, group)
        return loss

    def _update(self, p: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        param, grad = _local(p), _local(p.grad)
        exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        state["step"] += 1
        step = state["step"].item()

        quantized = isinstance(param, QuantTensor)
        # fp32 working copy: dequantize once (quantized), upcast (bf16/fp16), or in place (fp32)
        p32 = param.dequantize(torch.float32) if quantized else param if param.dtype == torch.float32 else param.float()
        g = grad.float()
        if group["maximize"]:
            g = -g

        p32.mul_(1 - lr * wd)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = exp_avg_sq
        if group["amsgrad"]:
            max_sq = _local(state["max_exp_avg_sq"])
            torch.maximum(max_sq, exp_avg_sq, out=max_sq)
            second = max_sq
        bias_c1 = 1 - beta1**step
        bias_c2 = 1 - beta2**step
        denom = (second.sqrt() / math.sqrt(bias_c2)).add_(eps)
        p32.addcdiv_(exp_avg, denom, value=-lr / bias_c1)

        if quantized:
            param.requantize_(p32)  # the single stochastic-rounding requantization of this step
        elif p32 is not param:
            if param.dtype == torch.bfloat16 and group["bf16_stochastic_round"]:
                param.copy_(fp32_to_bf16_stochastic(p32))
            else:
                param.copy_(p32)
