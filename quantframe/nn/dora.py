"""DoRA / LoRA adapters over a frozen (optionally quantized) base weight: ``DoRALinear``.

    y = (x @ W.T + s * (x @ A.T) @ B.T) * m / ||W + s * B @ A||_row + b        (DoRA)
    y =  x @ W.T + s * (x @ A.T) @ B.T + b                                      (LoRA)

``W [N, K]`` is the frozen base (plain float, ``NF4Tensor``, int8/int4 ``AffineQuantizedTensor``,
any ``QuantTensor`` with ``dequantize``), ``A [r, K]``, ``B [N, r]``, ``m [N]`` train, and
``s = alpha / r``. The row norm is *detached*, as in the DoRA paper's practical version (section
4.3, "we treat ||V + dV||_c as a constant") and PEFT's ``DoraLinearLayer`` (``weight_norm.detach()``):
no gradient flows through it, which saves the [N, K] backward of the norm. The bias is not
scaled by ``m / ||.||`` (as in PEFT). The three large matmuls (``x W.T``, ``dy W`` and the
backward's recompute of ``x W.T``) run in the activation dtype when it is bf16/fp16 (tensor cores,
fp32 accumulation: the product rounded once, as in PEFT and ``nn.Linear``); everything else (the
rank-r branch, the row norm, the scaling, the gradients of A, B, m) in fp32 (fp64 for fp64
inputs), with one rounding to the activation dtype at the end.

Example::

    apply_adapters_(model, dora(rank=16, base=nf4_weight_only()))   # nn.Linear -> DoRALinear
    ...train the lora_A / lora_B / magnitude parameters...
    merge_adapters_(model)                                          # DoRALinear -> nn.Linear
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantframe.api import QuantConfig, quantize_
from quantframe.tensor import QuantTensor

logger = logging.getLogger("quantframe")

__all__ = ["DoRAConfig", "DoRALinear", "apply_adapters_", "dora", "lora", "merge_adapters_"]


# ---- config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoRAConfig(QuantConfig):
    """Adapters for :func:`apply_adapters_` (a module swap, so not a ``quantize_`` config)."""

    rank: int = 16  # r: inner dimension of B @ A
    alpha: float = 16.0  # scaling s = alpha / rank
    base: QuantConfig | None = None  # how to quantize the frozen base; None keeps it dense
    use_dora: bool = True  # False: plain LoRA (no magnitude, no norm)
    dropout: float = 0.0  # dropout on the adapter branch's input only

    def __post_init__(self) -> None:
        who = "dora" if self.use_dora else "lora"
        _check_rank(self.rank, who)
        _check_alpha_dropout(self.alpha, self.dropout, who)
        if self.base is not None and not isinstance(self.base, QuantConfig):
            raise TypeError(f"{who}: base must be a QuantConfig or None, got {type(self.base).__name__}")


def dora(rank: int = 16, alpha: float = 16.0, base: QuantConfig | None = None, dropout: float = 0.0) -> DoRAConfig:
    """Config for DoRA adapters (QDoRA when ``base`` quantizes).

    Example::

        apply_adapters_(model, dora(rank=16, base=nf4_weight_only()))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    """
    return DoRAConfig(rank, alpha, base, True, dropout)


def lora(rank: int = 16, alpha: float = 16.0, base: QuantConfig | None = None, dropout: float = 0.0) -> DoRAConfig:
    """Config for LoRA adapters (QLoRA when ``base`` quantizes).

    Example::

        apply_adapters_(model, lora(rank=8, base=int4_weight_only(group_size=32)))
    """
    return DoRAConfig(rank, alpha, base, False, dropout)


def _check_rank(rank: object, who: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"{who}: rank={rank!r} must be a positive int")


def _check_alpha_dropout(alpha: object, dropout: object, who: str) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{who}: alpha={alpha!r} must be a positive finite number")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{who}: dropout={dropout!r} must be in [0, 1)")


# ---- numerics --------------------------------------------------------------------------------
def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64 only for gradcheck


def _mm_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the three large matmuls (``x W.T``, ``dy W``, the ``dm`` recompute): 16-bit inputs
    keep their dtype (tensor cores, fp32 accumulation, one rounding of the product, as PEFT and a
    plain ``nn.Linear``); fp32 / fp64 inputs stay exact."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else _acc_dtype(x)


def _base_weights(weight: Tensor, acc: torch.dtype, mm: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(W for the row norm, W for the matmuls)``: a dense base as it is (the norm kernel reads any
    float dtype in fp32); a quantized one dequantized once in ``acc``, so the norm is the one
    :func:`weight_norm` gives (scale exactly 1 at init), then cast to ``mm`` for the matmuls."""
    w = _dense(weight, acc) if isinstance(weight, QuantTensor) else weight
    return w, w.to(mm)


def _dense(w: Tensor, dtype: torch.dtype) -> Tensor:
    return w.dequantize(dtype) if isinstance(w, QuantTensor) else w.to(dtype)


def _full(t: Tensor | None) -> Tensor | None:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), else ``t``.

    Inside forward FSDP2 hands the layer unsharded tensors; outside it (``merge``, a norm taken
    between steps) the parameters are ``DTensor`` row shards, and a row norm or ``B @ A`` of
    shards would be wrong (``B``'s and ``W``'s rows are split, ``A`` is too).
    """
    if t is not None and torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def weight_norm(w: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``||W + s * B @ A||_2`` per output row: ``[N]`` (fp32, fp64 for an fp64 ``A``), no gradient.

    The same function the forward uses, so ``m = weight_norm(...)`` at B = 0 gives a scale of exactly 1.

    ``w`` ``[N, K]`` dense or a QuantTensor, ``lora_A`` ``[r, K]``, ``lora_B`` ``[N, r]``.
    """
    from quantframe.kernels.dora import dora_column_norm  # lazy: keeps `import quantframe` triton-free

    w, lora_A, lora_B = _full(w), _full(lora_A), _full(lora_B)  # FSDP2 shards: the whole rows
    w = _dense(w, _acc_dtype(lora_A))
    return dora_column_norm(w, lora_A, lora_B, torch.ones_like(w[:, 0]), scaling)[0]


class _DoRALinearFn(torch.autograd.Function):
    """Forward and backward of :class:`DoRALinear` on 2-D ``x [M, K]``; the base gets no gradient.

    With s = alpha / r, xa = x_lora @ A.T, pre = x W.T + s xa B.T and c = m / ||.|| (DoRA; LoRA: c = 1):
    y = pre * c + b. The matmuls run in ``mm`` (the activation dtype when it is 16-bit, else fp32 /
    fp64), one fused product each: the rank-r product is the ``addmm``'s addend, which the base GEMM adds
    in its epilogue, and in backward c is folded into the ``[N, K]`` weight (one pass,
    ``dora_row_scale``) and the ``[N, r]`` B instead of the ``[M, N]`` gradient (``addmm_inplace``: no
    copy of the addend, compiled or not):
        dx = g @ (c W) + (g @ (s c B)) @ A        dA = (g @ (s c B)).T @ x_lora
        dB = s c (g.T @ xa)                       dm = sum_M(g * pre) / ||.||       db = sum_M(g)
    DoRA keeps ``pre`` (``[M, N]`` in ``mm``) for dm instead of recomputing the base matmul. Unfused,
    DoRA's forward is the base GEMM alone and one pass ``dora_lora_scale`` that adds the rank-r term
    per tile and scales (no ``[M, N]`` rank-r product, no ``addmm`` copy); its saved ``pre`` then
    lacks the rank-r term, whose share of dm is ``rowsum((g.T @ xa) * s B)`` (dB's product).
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, magnitude, scaling: float, use_dora: bool,
                fused: bool = False):  # fmt: skip
        acc, mm = _acc_dtype(x), _mm_dtype(x)
        # x_lora None: no dropout, the branch reads x (dynamo rejects one tensor passed twice)
        x_lora = x if x_lora is None else x_lora
        ctx.shared_input = x_lora is x
        w_norm, w = _base_weights(weight, acc, mm)  # [N, K] each
        xa = x_lora.to(mm) @ lora_A.to(mm).T  # [M, r]
        lora_b = (scaling * lora_B.to(acc)).to(mm)  # [N, r], s B
        norm = scale = None
        if use_dora:
            # lazy: keeps `import quantframe` triton-free
            from quantframe.kernels.dora import dora_column_norm

            # [N] each, fp32; fused on CUDA (B @ A never written); the norm is a constant for autograd
            norm, scale = dora_column_norm(w_norm, lora_A.to(acc), lora_B.to(acc), magnitude, scaling)
        ctx.pre_has_lora = True  # whether the saved pre holds the rank-r term (else dm adds its share)
        if fused and mm in (torch.bfloat16, torch.float16):
            from quantframe.kernels.dora import dora_linear

            # one GEMM: x W.T, the LoRA add and the scale / bias epilogue; pre stored once for dm
            out, pre = dora_linear(x.to(mm), w, xa, lora_b, scale, bias, x.dtype)
        elif use_dora:
            from quantframe.kernels.dora import dora_lora_scale

            # the base GEMM alone (cuBLAS), then one pass: + xa (sB).T formed per tile, * scale, + bias
            pre = x.to(mm) @ w.T  # [M, N], saved for dm
            out = dora_lora_scale(pre, xa, lora_b, scale, bias, x.dtype)
            ctx.pre_has_lora = False
        else:
            from quantframe.kernels.dora import addmm_inplace

            # LoRA: the rank-r product first; the base GEMM adds it in its epilogue (cuBLAS beta = 1)
            pre = addmm_inplace(xa @ lora_b.T, x.to(mm), w.T)
            out = pre if bias is None else pre + bias.to(mm)
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, magnitude, xa, norm, pre if use_dora else None)
        ctx.scaling, ctx.use_dora, ctx.bias_dtype = scaling, use_dora, None if bias is None else bias.dtype
        # `out` is already in x's dtype: no `.to` here. On torch 2.11 a no-op `.to` returned from a
        # compiled autograd.Function (an alias of an intermediate) made AOTAutograd zero its tangent:
        # every gradient came back 0 (test_gpu.py: test_compiled_gradients_match_eager_on_cuda)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, x_lora, weight, lora_A, lora_B, magnitude, xa, norm, pre = ctx.saved_tensors
        s, acc, mm = ctx.scaling, _acc_dtype(x), _mm_dtype(x)
        need = ctx.needs_input_grad
        g = grad_out.to(mm)
        c = magnitude.to(acc) / norm if ctx.use_dora else None  # [N]
        sc = s if c is None else s * c[:, None]  # the scale of B's rows
        gxa = g @ (sc * lora_B.to(acc)).to(mm)  # [M, r] = (g * c) @ (s B)
        dx = dx_lora = None
        a = lora_A.to(mm)
        if need[0]:
            from quantframe.kernels.dora import addmm_inplace

            if c is None:
                w = _base_weights(weight, acc, mm)[1]
            else:  # c W in one pass ([N, K]; a quantized base dequantized once, in acc)
                from quantframe.kernels.dora import dora_row_scale

                w = dora_row_scale(_dense(weight, acc) if isinstance(weight, QuantTensor) else weight, c, mm)
            # (g * c) @ W, added in the GEMM's epilogue to the LoRA path's share when x feeds both
            dx = addmm_inplace(gxa @ a, g, w) if ctx.shared_input else g @ w
            dx = dx.to(x.dtype)
        if not ctx.shared_input and need[1]:
            dx_lora = (gxa @ a).to(x_lora.dtype)
        db = grad_out.to(acc).sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[3] else None
        dA = (gxa.T @ x_lora.to(mm)).to(lora_A.dtype) if need[4] else None
        lora_dm = ctx.use_dora and need[6] and not ctx.pre_has_lora
        gtxa = (g.T @ xa).to(acc) if need[5] or lora_dm else None  # [N, r]
        dB = (gtxa * sc).to(lora_B.dtype) if need[5] else None
        dm = None
        if ctx.use_dora and need[6]:
            gp = (g * pre).sum(0, dtype=acc)  # sum_M g * pre, [N]
            if lora_dm:  # pre without the rank-r term: sum_M g * (xa (sB).T) = rowsum(g.T xa * sB)
                gp = gp + (gtxa * (s * lora_B.to(acc))).sum(1)
            dm = (gp / norm).to(magnitude.dtype)
        return dx, dx_lora, None, db, dA, dB, dm, None, None, None


# ---- the layer -------------------------------------------------------------------------------
class DoRALinear(nn.Module):
    """A linear layer with a frozen base weight and trainable DoRA (or LoRA) adapters.

    Args:
        base_weight: ``[N, K]`` float tensor or QuantTensor (NF4, affine int8/int4, ...); frozen.
        bias: ``[N]`` or None; frozen, part of the base.
        rank, alpha: ``r`` (1 <= r <= min(N, K)) and the scaling ``s = alpha / r``.
        dropout: dropout on the adapter branch's input only (PEFT's convention).
        use_dora: False gives plain LoRA (no ``magnitude``).
        dtype: of ``lora_A`` ``[r, K]``, ``lora_B`` ``[N, r]`` and ``magnitude`` ``[N]``; default
            float32 (so ``m / ||W||`` is exactly 1 at init and the layer starts equal to the base).

    Raises ``TypeError`` for a base that is not a floating-point tensor, ``ValueError`` for a
    non-2-D base, a bad rank, alpha, dropout or bias shape.

    Example::

        layer = DoRALinear(NF4Tensor.from_float(linear.weight), linear.bias, rank=16, alpha=32)
        y = layer(x)                     # equals linear(x) up to NF4 error until B moves
    """

    def __init__(
        self,
        base_weight: Tensor,
        bias: Tensor | None = None,
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_dora: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        if not isinstance(base_weight, Tensor) or not base_weight.dtype.is_floating_point:
            got = base_weight.dtype if isinstance(base_weight, Tensor) else type(base_weight).__name__
            raise TypeError(f"{who}: base_weight must be a floating-point Tensor or QuantTensor, got {got}")
        if base_weight.dim() != 2:
            raise ValueError(f"{who}: base_weight must be 2-D [out_features, in_features], got {tuple(base_weight.shape)}")
        n, k = base_weight.shape
        _check_rank(rank, who)
        if rank > min(n, k):
            raise ValueError(f"{who}: rank={rank} must be <= min(out_features, in_features) = {min(n, k)}")
        _check_alpha_dropout(alpha, dropout, who)
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (n,)):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{who}: bias must be a [{n}] tensor or None, got {got}")
        self.in_features, self.out_features = k, n
        self.rank, self.alpha, self.scaling, self.use_dora = rank, float(alpha), alpha / rank, use_dora
        # Parameters with requires_grad=False (not buffers): state_dict, .to() and FSDP2 see them.
        self.weight = nn.Parameter(base_weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(rank, k, dtype=dtype, device=base_weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n, rank, dtype=dtype, device=base_weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in PEFT
        self.magnitude = None
        if use_dora:
            norm = weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling)  # B = 0: ||W||
            self.magnitude = nn.Parameter(norm.to(dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # One Triton GEMM for the forward product, the LoRA add and the scale (kernels/dora.py:
        # dora_linear) with 16-bit activations. Off by default: on an H200 at 8 x 2048 tokens it took
        # 1,160 us against 944 for cuBLAS + the one-pass epilogue (docs/dora.md).
        self.fused_forward = False

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        x2d = x.reshape(-1, self.in_features)
        x_lora = self.dropout(x2d) if self.training and isinstance(self.dropout, nn.Dropout) else None
        y = _DoRALinearFn.apply(
            x2d, x_lora, self.weight, self.bias, self.lora_A, self.lora_B,
            self.magnitude, self.scaling, self.use_dora, self.fused_forward,
        )  # fmt: skip
        # _unsafe_view: not a view for autograd, so FSDP2's pre-backward hook on the output holds
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], self.out_features))

    @torch.no_grad()
    def merge(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight ``[N, K]`` the layer applies: ``m / ||W + sBA|| * (W + sBA)`` (LoRA:
        ``W + sBA``), computed in fp32 and returned in ``dtype``; the layer is not changed.

        Under FSDP2 (``DTensor`` parameters) every rank must call it: it gathers the whole
        weight and returns it on every rank."""
        a, b, m = _full(self.lora_A), _full(self.lora_B), _full(self.magnitude)
        acc = _acc_dtype(a)
        v = _dense(_full(self.weight), acc) + self.scaling * (b.to(acc) @ a.to(acc))
        if self.use_dora:
            v = v * (m.to(acc) / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1)
        return v.to(dtype)

    def extra_repr(self) -> str:
        base = type(self.weight).__name__ if isinstance(self.weight, QuantTensor) else str(self.weight.dtype)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, base={base}, use_dora={self.use_dora}, bias={self.bias is not None}"
        )


# ---- module swaps ----------------------------------------------------------------------------
def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def apply_adapters_(
    model: nn.Module, config: DoRAConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> None:
    """Replace each selected ``nn.Linear`` of ``model`` by a :class:`DoRALinear`, in place.

    ``filter_fn(module, fqn)`` selects (default: every ``nn.Linear``). Each selected Linear's
    weight is first quantized with ``config.base`` (through ``quantize_``, so its handler and
    shape checks apply) and then frozen; the new layer's adapters start so that it computes
    what the (quantized) Linear computed. A Linear the base scheme cannot take, or whose weight
    is tied to another parameter, is left alone and reported in one log line (logger
    ``"quantframe"``). Other parameters of the model are not frozen: that is the caller's choice.

    Raises ``TypeError`` for a model that is not an ``nn.Module`` or a config that is not a
    :class:`DoRAConfig`, ``ValueError`` when ``filter_fn`` selects a module that is not an
    ``nn.Linear`` or is the model itself, and what ``DoRALinear`` raises (e.g. rank too large).

    Example::

        apply_adapters_(model, dora(rank=16, base=nf4_weight_only()))
        print(model)   # ... (0): DoRALinear(in_features=64, ..., base=NF4Tensor, use_dora=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_adapters_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, DoRAConfig):
        raise TypeError(f"apply_adapters_ expects a DoRAConfig (dora(...) or lora(...)), got {config!r}")
    select = filter_fn or _default_filter
    modules = list(model.named_modules())
    owners: dict[int, int] = {}  # id(parameter) -> number of modules holding it
    for _, module in modules:
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    done, skipped = [], {}
    for fqn, module in modules:
        if isinstance(module, DoRALinear) or not select(module, fqn):
            continue
        if not isinstance(module, nn.Linear) or not fqn:
            what = "the model itself" if not fqn else f"{fqn} ({type(module).__name__})"
            raise ValueError(f"apply_adapters_: filter_fn selected {what}; only nn.Linear submodules can be swapped")
        if owners[id(module.weight)] > 1:
            skipped[fqn] = "weight is tied to another module; an adapter would untie it"
            continue
        if config.base is not None:
            quantize_(module, config.base)  # swaps module.weight, or records why not
            if not isinstance(module.weight, QuantTensor):
                skipped[fqn] = module._quantframe_skipped.get("", "not quantized by the base config")
                continue
        new = DoRALinear(
            module.weight, module.bias, config.rank, config.alpha, config.dropout, config.use_dora,
            dtype=torch.float32,
        )  # fmt: skip
        _set_submodule(model, fqn, new)
        done.append(fqn)
    logger.info(
        "apply_adapters_(%s, rank=%d, base=%s): adapted %d linears, skipped %d%s",
        "dora" if config.use_dora else "lora",
        config.rank,
        "dense" if config.base is None else config.base.name,
        len(done),
        len(skipped),
        "".join(f"\n  skipped {k}: {v}" for k, v in skipped.items()),
    )


def merge_adapters_(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Replace each :class:`DoRALinear` of ``model`` by an ``nn.Linear`` with its merged weight.

    The merged weight (:meth:`DoRALinear.merge`) and the bias are dense, in ``dtype`` (default
    float32); re-quantizing the merged model (``quantize_``) is the caller's choice, and adds the
    scheme's rounding error again. The new Linears' weights have ``requires_grad=True``.

    Example::

        merge_adapters_(model)
        quantize_(model, int8_weight_only())   # optional: a quantized inference model
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge_adapters_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DoRALinear):
        raise ValueError("merge_adapters_: the model is a DoRALinear itself; use its merge() method")
    for fqn, module in list(model.named_modules()):
        if not isinstance(module, DoRALinear):
            continue
        w = module.merge(dtype)
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, w.device, dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        _set_submodule(model, fqn, linear)
