"""BitNet b1.58 layers: ``BitLinear`` (unfused reference ops) and ``FusedBitLinear`` (fused kernel).

Per token of ``x [..., K]``, with float master weights ``W [N, K]`` and ``norm_weight [K]``::

    n  = x * rsqrt(mean(x ** 2) + eps) * norm_weight            (RMSNorm, fp32)
    xq = int8 absmax quantize-dequantize of n per token         (quantframe.ternary.quantize_activations_int8)
    Wq = clamp(round(W / s), -1, 1) * s, s = max(mean|W|, 1e-5) (quantframe.ternary.ternary_quantize)
    y  = xq @ Wq.T + bias                                       (fp32, cast to x.dtype)

Backward: straight-through estimator through both quantizers (their gradient is the identity), so
``dW = g.T @ xq`` reaches the float weight and ``dx`` is RMSNorm's backward of ``g @ Wq``.

``FusedBitLinear`` computes ``xq`` with :func:`quantframe.kernels.rmsnorm_quant.rmsnorm_quant`
(one Triton kernel on CUDA, its reference elsewhere) and holds ``xq`` in ``x.dtype`` between
the norm and the matmul, as the kernel returns it; ``BitLinear`` keeps it in fp32. The two agree
exactly in fp32 up to a code that flips where the norm's sums round differently.

Example::

    layer = FusedBitLinear(1024, 4096)
    y = layer(torch.randn(8, 1024))
    quantframe.optim.AdamW(layer.parameters(), lr=1e-3)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantframe.ternary import _ternary, quantize_activations_int8

__all__ = ["BitLinear", "FusedBitLinear"]


class _ActQuantSTE(torch.autograd.Function):
    """fp32 per-token INT8 quantize-dequantize (``quantize_activations_int8``); backward = identity."""

    @staticmethod
    def forward(ctx, n: Tensor) -> Tensor:
        codes, scale = quantize_activations_int8(n)
        return codes.float() * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _TernarySTE(torch.autograd.Function):
    """fp32 ``Wq = codes * s`` (absmean ternary); backward = identity into the float weight."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ctx.w_dtype = w.dtype
        codes, s = _ternary(w)
        return codes.float() * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.to(ctx.w_dtype)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """fp32 RMSNorm of ``x [..., K]``."""
    xf = x.float()
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()


class BitLinear(nn.Linear):
    """``nn.Linear`` with BitNet b1.58's forward: RMSNorm, INT8 activations, ternary weights (STE).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (``bias`` defaults to False,
            as in BitNet).
        eps: RMSNorm epsilon.

    Parameters: ``weight [N, K]`` and ``bias [N]`` (float masters, as ``nn.Linear``) and
    ``norm_weight [K]`` (ones). Input ``[..., K]`` float, output ``[..., N]`` in the input dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps={eps!r} must be positive")
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))

    def quantized_input(self, x: Tensor) -> Tensor:
        """``xq [..., K]``: RMSNorm then per-token INT8 quantize-dequantize (fp32, STE)."""
        n = _rms_norm(x, self.norm_weight, self.eps)
        return _ActQuantSTE.apply(n.reshape(-1, n.shape[-1])).reshape(n.shape)

    def forward(self, x: Tensor) -> Tensor:
        if (
            not isinstance(x, Tensor)
            or not x.dtype.is_floating_point
            or x.dim() == 0
            or x.shape[-1] != self.in_features
        ):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}: input must be a float [..., {self.in_features}] tensor, got {got}"
            )
        xq = self.quantized_input(x)
        wq = _TernarySTE.apply(self.weight)
        return F.linear(xq.float(), wq, None if self.bias is None else self.bias.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class FusedBitLinear(BitLinear):
    """:class:`BitLinear` whose RMSNorm + activation quantization is one fused kernel
    (:func:`~quantframe.kernels.rmsnorm_quant.rmsnorm_quant`; its reference on CPU). Same
    parameters, same result within rounding, same gradients."""

    def quantized_input(self, x: Tensor) -> Tensor:
        from quantframe.kernels.rmsnorm_quant import rmsnorm_quant  # lazy: keeps `import quantframe` triton-free

        return rmsnorm_quant(x, self.norm_weight, None, self.eps)[0]
