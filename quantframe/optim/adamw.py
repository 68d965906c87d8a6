"""AdamW that updates quantized weights with one dequantize and one requantize per step, and
AdamW8bit, the same optimizer with 8-bit moments (2 bytes of state per parameter instead of 8).

A per-row int8 weight (``Int8QTLinearWeight``) takes the fused step of
``quantframe.kernels.adamw_step``: one pass per row reads int8 + grad + moments and writes int8 +
moments (Triton on CUDA; on CPU its reference: one dequantize, fp32 math, one requantize).
Everything else, and the cases the kernel does not cover (amsgrad, 8-bit moments of rows whose
length is not a multiple of 256), takes the unfused fp32 path below.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quantframe.optim.state8bit import BLOCK_SIZE, OptimState8bit
from quantframe.primitives import fp32_to_bf16_stochastic
from quantframe.tensor import QuantTensor

__all__ = ["AdamW", "AdamW8bit"]

_STATE_DTYPES = (torch.float32, torch.bfloat16)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # not a QuantTensor, DTensor or other subclass


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter or state), or the tensor itself. The DTensor's
    own local tensor: ``to_local()`` of a Parameter(DTensor) returns a new Parameter wrapper each
    call, which would make every step's plans (``AdamW._plan``) look stale."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        return local
    return t.to_local() if hasattr(t, "to_local") else t


def _fp32(state: Tensor) -> Tensor:
    """An fp32 working copy of a moment: the state itself (fp32, updated in place) or its value (bf16, 8-bit)."""
    if isinstance(state, QuantTensor):
        return state.dequantize(torch.float32)
    return state if state.dtype == torch.float32 else state.float()


def _write_back(state: Tensor, value: Tensor) -> None:
    if value is not state:
        state.copy_(value)  # an 8-bit state: its one re-quantization of the step


def _rowwise_int8(param: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(int_data [rows, row_len], scale [rows])`` of a weight the fused step can update in place, else None.

    The contract (Int8QTLinearWeight's layout; optim/ may not import schemes): a QuantTensor whose
    inner tensors are exactly ``int_data``, int8 codes in [-127, 127], and ``scale``, fp32
    ``absmax / 127`` of each run of ``row_len`` contiguous codes.
    """
    if not isinstance(param, QuantTensor) or param.tensor_names != ("int_data", "scale"):
        return None
    q, s = param.int_data, param.scale
    rows = s.numel()
    if q.dtype != torch.int8 or s.dtype != torch.float32 or s.dim() != 1 or rows == 0 or q.numel() % rows:
        return None
    if not (q.is_contiguous() and s.is_contiguous()):
        return None
    return q.view(rows, -1), s


def _fused_states(exp_avg: Tensor, exp_avg_sq: Tensor, rows: int, k: int) -> tuple[list[Tensor], dict] | None:
    """The moments as ``adamw_step`` takes them (``[rows, k]`` views + 8-bit parts), or None."""
    pair = (exp_avg, exp_avg_sq)
    if all(isinstance(s, OptimState8bit) for s in pair):
        # a row must hold whole state blocks, so that one kernel program re-quantizes them alone
        if k % BLOCK_SIZE or not all(s.numel() == rows * k and s.codes.is_contiguous() for s in pair):
            return None
        parts = dict(exp_avg_scale=exp_avg.scale, exp_avg_sq_scale=exp_avg_sq.scale,
                     exp_avg_qmap=exp_avg.qmap, exp_avg_sq_qmap=exp_avg_sq.qmap)  # fmt: skip
        return [s.codes.view(rows, k) for s in pair], parts
    plain = [not isinstance(s, QuantTensor) and s.is_contiguous() for s in pair]
    if all(plain) and exp_avg.dtype == exp_avg_sq.dtype and exp_avg.dtype in _STATE_DTYPES:
        return ([s.view(rows, k) for s in pair], {}) if exp_avg.numel() == rows * k else None
    return None


def _inner(t: Tensor) -> tuple[Tensor, ...]:
    """A QuantTensor's inner tensors (``tensor_names``), else none."""
    return tuple(getattr(t, n) for n in t.tensor_names) if isinstance(t, QuantTensor) else ()


def _float_weight(param: Tensor) -> Tensor:
    """The plain tensor holding a parameter's values: the parameter itself, or the ``float_data`` of a
    QuantTensor that is only its float weight computed differently (``int8_mixed_precision_training``
    without INT8 weights; the contract, as ``_rowwise_int8``'s: its one inner tensor is the value).
    Updating it in place updates the parameter."""
    if isinstance(param, QuantTensor) and param.tensor_names == ("float_data",):
        data = param.float_data
        if type(data) in _PLAIN_TYPES and data.shape == param.shape:
            return data
    return param


def _fusable_plain(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, group: dict) -> bool:
    """Whether torch's own fused AdamW kernel can update this plain parameter (its math is this class's)."""
    tensors = (param, grad, exp_avg, exp_avg_sq)
    return (
        not group["amsgrad"]
        and not (group["bf16_stochastic_round"] and param.dtype == torch.bfloat16)
        and param.dtype in _STATE_DTYPES + (torch.float16,)
        and all(type(t) in _PLAIN_TYPES and t.dtype == param.dtype and t.layout == torch.strided for t in tensors)
    )


def _fused_plain_step(items: list[tuple[Tensor, Tensor, Tensor, Tensor, float]], group: dict) -> None:
    """torch's fused AdamW over plain parameters whose moments share their dtype: one launch per
    (device, dtype) instead of ~10 elementwise kernels per parameter. ``items``: (param, grad,
    exp_avg, exp_avg_sq, step after this update)."""
    beta1, beta2 = group["betas"]
    by_key: dict[tuple, list] = {}
    for item in items:
        by_key.setdefault((item[0].device, item[0].dtype), []).append(item)
    for (device, _), batch in by_key.items():
        params, grads, ms, vs, steps = map(list, zip(*batch))
        step_t = torch.tensor(steps, dtype=torch.float32)
        if device.type == "cuda":  # pinned: a pageable host-to-device copy would wait for the GPU to drain
            step_t = step_t.pin_memory().to(device, non_blocking=True)
        step_t = step_t.unbind()
        torch._fused_adamw_(
            params, grads, ms, vs, [], list(step_t), lr=float(group["lr"]), beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=group["maximize"],
        )  # fmt: skip


class AdamW(torch.optim.Optimizer):
    """Drop-in for ``torch.optim.AdamW`` (same arguments, same math for plain parameters).

    All math is fp32. The moments are fp32 by default, whatever the parameter dtype;
    ``state_dtype=torch.bfloat16`` stores them in bf16 (rounded to nearest, 4 bytes of state per
    parameter instead of 8) and ``state_dtype=None`` in each parameter's dtype, as torch's AdamW
    does (bf16 for a bf16 model; an INT8 weight's dtype is its gradient's). Plain parameters whose
    moments share their dtype take torch's fused AdamW kernel (one launch for all of them), and so
    do the float weights of ``int8_mixed_precision_training`` (their ``float_data``). A quantized
    parameter (any :class:`~quantframe.QuantTensor` with ``requantize_``) is dequantized once,
    updated in fp32 and written back once with stochastic rounding — torch's AdamW would
    requantize after each of its in-place ops. With ``bf16_stochastic_round=True``, bf16
    parameters are written back with stochastic rounding too (pure-bf16 training without an
    fp32 master copy). Works on FSDP2 (DTensor) parameters: rows are whole on each shard, so
    the per-shard update equals the unsharded one; the moments are DTensors sharded like their
    parameter.

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
        state_dtype: torch.dtype | None = torch.float32,
    ):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: invalid betas {betas}; each must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: invalid weight_decay {weight_decay}")
        if state_dtype not in (*_STATE_DTYPES, None):
            raise ValueError(
                f"AdamW: invalid state_dtype {state_dtype}; expected torch.float32, torch.bfloat16 or None "
                f"(each parameter's dtype)"
            )
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, bf16_stochastic_round=bf16_stochastic_round, state_dtype=state_dtype,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = {"step": torch.tensor(0.0), "exp_avg": self._zeros(p, group, signed=True),
                 "exp_avg_sq": self._zeros(p, group, signed=False)}  # fmt: skip
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self._zeros(p, group, signed=False)
        return state

    @staticmethod
    def _state_dtype(p: Tensor, group: dict) -> torch.dtype:
        want = group.get("state_dtype", torch.float32)  # absent in a state_dict of an older version
        return p.dtype if want is None else want

    def _zeros(self, p: Tensor, group: dict, signed: bool) -> Tensor:
        """A zero moment for ``p`` in the group's state dtype, shaped (and, for a DTensor, sharded) like ``p``."""
        return torch.zeros_like(p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts each floating state to its parameter's dtype (bf16 for a bf16 model);
        # the moments here take the group's state dtype (an 8-bit state only changes its outer dtype back).
        for group in self.param_groups:
            group.setdefault("state_dtype", torch.float32)
            for p in group["params"]:
                state = self.state.get(p, {})
                for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if name in state:
                        quantized = isinstance(_local(state[name]), QuantTensor)  # its outer dtype is fp32
                        state[name] = state[name].to(torch.float32 if quantized else self._state_dtype(p, group))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plain = []  # parameters for torch's fused kernel, updated together after the loop
            int8: dict[tuple, tuple] = {}  # key -> (step, code maps, INT8 weights, their plans not yet checked)
            with torch._C.DisableTorchFunctionSubclass():  # p.grad and hash(p) without a subclass's __torch_function__
                items = [(p, g, self.state[p]) for p in group["params"] if (g := p.grad) is not None]
            for p, grad, state in items:
                if grad.is_sparse:
                    raise TypeError("AdamW does not support sparse gradients")
                if not state:
                    state.update(self._init_state(p, group))
                grad = _local(grad)
                kind, data, cached = self._plan(p, grad, state, group)
                if kind == "unfused":
                    self._update(p, state, group)
                    continue
                state["step"] += 1
                step = state["step"].item()
                if kind == "plain":
                    weight, exp_avg, exp_avg_sq = data
                    plain.append((weight, grad, exp_avg, exp_avg_sq, step))
                else:  # "int8"
                    key, maps, weight, checked = data
                    entry = int8.setdefault((*key, step), (step, maps, [], []))
                    entry[2].append(dict(weight, grad=grad.reshape(weight["int_data"].shape)))
                    if not checked:
                        entry[3].append(cached)
            if plain:
                _fused_plain_step(plain, group)
            for step, maps, weights, unchecked in int8.values():
                self._fused_launch(step, maps, weights, group, check=bool(unchecked))
                for plan in unchecked:  # launched with the kernel's argument checks: later launches skip them
                    plan[3] = (*plan[3][:3], True)
        return loss

    def _plan(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> tuple[str, tuple | None, list]:
        """How ``p`` is updated: ``("plain", (weight, exp_avg, exp_avg_sq))`` (torch's fused kernel),
        ``("int8", (launch key, code maps, weight dict without grad, checked))`` (the fused INT8 step)
        or ``("unfused", None)``, and the cache entry holding it. Worked out once and reused while the
        tensors it read are the same objects and the gradient keeps its dtype, shape and device, so
        that a step costs a few µs of Python per parameter (the anchor model's 24 INT8 weights, CPU,
        kernel stubbed: 1.0 ms a step without the cache). ``checked``: a launch with the kernel's
        argument checks has taken the weight."""
        param, m, v = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        # the tensors read below, inner tensors of quantized weights and 8-bit states included
        objects = tuple(x for t in (param, m, v) for x in (t, *_inner(t)))
        values = (grad.dtype, grad.shape, grad.device, group["amsgrad"], group["bf16_stochastic_round"])
        plans = self.__dict__.setdefault("_plans", {})  # id(p) -> [objects, values, kind, data]
        cached = plans.get(id(p))
        if cached is not None and cached[1] == values and len(cached[0]) == len(objects) and all(
            a is b for a, b in zip(cached[0], objects)
        ):
            return cached[2], cached[3], cached
        if _fusable_plain(weight := _float_weight(param), grad, m, v, group):
            kind, data = "plain", (weight, m, v)
        elif (fused := self._fused_item(param, grad, m, v, group)) is not None:
            kind, data = "int8", (*fused, False)
        else:
            kind, data = "unfused", None
        cached = plans[id(p)] = [objects, values, kind, data]  # holds p: its id cannot be reused
        return kind, data, cached

    @staticmethod
    def _fused_item(param, grad, exp_avg, exp_avg_sq, group: dict) -> tuple | None:
        """``(launch key without the step, code maps, weight dict without grad)`` of an INT8 weight the
        fused kernel updates; None where the kernel does not apply. Weights with one key (device, row
        length, dtypes, code maps) and step share one launch (``adamw_step_multi``)."""
        if group["amsgrad"]:
            return None
        rowwise = _rowwise_int8(param)
        if rowwise is None:
            return None
        int_data, scale = rowwise
        states = _fused_states(exp_avg, exp_avg_sq, *int_data.shape)
        if states is None:
            return None
        (m, v), parts = states
        maps = (parts.pop("exp_avg_qmap", None), parts.pop("exp_avg_sq_qmap", None))
        key = (int_data.device, int_data.shape[1], grad.dtype, m.dtype, *map(id, maps))
        weight = dict(int_data=int_data, scale=scale, exp_avg=m, exp_avg_sq=v)
        weight.update(parts)
        return key, maps, weight

    @staticmethod
    def _fused_launch(step: float, maps: tuple, weights: list[dict], group: dict, check: bool = True) -> None:
        from quantframe.kernels.adamw_step import adamw_step_multi  # lazy: `import quantframe` stays triton-free

        beta1, beta2 = group["betas"]
        qmaps = dict(exp_avg_qmap=maps[0], exp_avg_sq_qmap=maps[1]) if maps[0] is not None else {}
        adamw_step_multi(
            weights, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], bias_correction1=1 - beta1**step, bias_correction2=1 - beta2**step,
            maximize=group["maximize"], check=check, **qmaps,
        )  # fmt: skip

    def _update(self, p: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        param, grad = _local(p), _local(p.grad)
        exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        state["step"] += 1
        step = state["step"].item()
        bias_c1 = 1 - beta1**step
        bias_c2 = 1 - beta2**step
        quantized = isinstance(param, QuantTensor)
        # fp32 working copy: dequantize once (quantized), upcast (bf16/fp16), or in place (fp32)
        p32 = param.dequantize(torch.float32) if quantized else param if param.dtype == torch.float32 else param.float()
        g = grad.float()
        if group["maximize"]:
            g = -g
        m, v = _fp32(exp_avg), _fp32(exp_avg_sq)

        p32.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = v
        if group["amsgrad"]:
            max_sq = _local(state["max_exp_avg_sq"])
            second = _fp32(max_sq)
            torch.maximum(second, v, out=second)
            _write_back(max_sq, second)
        _write_back(exp_avg, m)
        _write_back(exp_avg_sq, v)
        denom = (second.sqrt() / math.sqrt(bias_c2)).add_(eps)
        p32.addcdiv_(m, denom, value=-lr / bias_c1)  # the fp32 moments, not their 8-bit images

        if quantized:
            param.requantize_(p32)  # the single stochastic-rounding requantization of this step
        elif p32 is not param:
            if param.dtype == torch.bfloat16 and group["bf16_stochastic_round"]:
                param.copy_(fp32_to_bf16_stochastic(p32))
            else:
                param.copy_(p32)


class AdamW8bit(AdamW):
    """:class:`AdamW` whose moments are 8-bit :class:`~quantframe.optim.OptimState8bit` tensors.

    ``exp_avg`` (signed map) and ``exp_avg_sq`` (unsigned map) are stored as uint8 codes with an
    fp32 absmax per block of 256 elements: ~2 bytes of state per parameter instead of 8. The math
    stays fp32; each moment is re-quantized once per step. Parameters with fewer than
    ``min_8bit_size`` elements keep moments in ``state_dtype``, as :class:`AdamW` (their memory is
    negligible and small tensors are the sensitive ones: biases, norms). The size is the
    parameter's *global* numel, so a model
    gets the same states sharded (FSDP2) or not (unlike pytorch/ao#4912, which decides on the
    local shard). With INT8 weights (``int8_weight_only_quantized_training``) that is 1 byte of
    weight + 2 bytes of state per parameter.

    Example::

        quantize_(model, int8_weight_only_quantized_training())
        opt = AdamW8bit(model.parameters(), lr=1e-3)
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 bf16_stochastic_round: bool = False, min_8bit_size: int = 4096,
                 state_dtype: torch.dtype | None = torch.float32):  # fmt: skip
        if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
            raise ValueError(f"AdamW8bit: invalid min_8bit_size {min_8bit_size!r}; expected an int >= 0")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         bf16_stochastic_round=bf16_stochastic_round, state_dtype=state_dtype)  # fmt: skip
        self.defaults["min_8bit_size"] = min_8bit_size  # for groups added later (add_param_group)
        for group in self.param_groups:
            group.setdefault("min_8bit_size", min_8bit_size)

    def _zeros(self, p: Tensor, group: dict, signed: bool) -> Tensor:
        min_size = group.get("min_8bit_size", self.defaults["min_8bit_size"])  # absent in an AdamW state_dict
        if p.numel() < min_size:  # a DTensor's numel is global: the same choice on every shard
            return super()._zeros(p, group, signed)
        local = _local(p)
        state = OptimState8bit.zeros(local.shape, signed, device=local.device)
        if local is not p:  # shard the state like the parameter, so state_dict / DCP see sharded states
            from torch.distributed.tensor import DTensor

            state = DTensor.from_local(state, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride())  # fmt: skip
        return state
