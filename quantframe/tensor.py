"""QuantTensor: the base of every quantized weight.

A subclass lists its inner tensors (``tensor_names``) and its plain attributes (``attr_names``);
from those the base derives ``__tensor_flatten__`` / ``__tensor_unflatten__`` (what
torch.compile and FSDP2 use to see inside), ``__repr__`` and the helpers ops use to rebuild a
tensor. Ops are listed per class in two tables, filled with ``@Cls.implements``:

* aten ops (``torch.ops.aten.*``), read by ``__torch_dispatch__``;
* torch functions (``F.linear``, ``torch.Tensor.to``...), read by ``__torch_function__``.

An aten op that is not in the table raises ``NotImplementedError`` naming the class, the op and
what is supported: a quantized tensor is never silently turned into a dense one. A torch
function that is not in the table goes on to aten as usual (and so to the aten table).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map

if torch.distributed.is_available():
    # Registers _c10d_functional._wrap_tensor_autograd (what DTensor.full_tensor sends on torch >= 2.11),
    # so every scheme can list it in its op table.
    import torch.distributed._functional_collectives  # noqa: F401

aten = torch.ops.aten

Handler = Callable[[Any, tuple, tuple, dict], Any]
_RESOLVED: dict[tuple[type, str, Any], Handler | None] = {}  # QuantTensor._lookup's memo

__all__ = [
    "QuantTensor",
    "fsdp_pre_all_gather_hook",
    "fsdp_all_gather_inputs",
    "fsdp_gathered",
    "check_weight",
    "unsupported_op_message",
    "DEQUANTIZING_OPS",
    "REQUANTIZING_INPLACE_OPS",
    "FOREACH_OPS",
    "dequantizing_op",
    "requantizing_inplace_op",
    "foreach_op",
    "WINDOW_OPS",
    "window_op",
    "row_slice_range",
    "row_slice_op",
    "same_shape_view_op",
    "same_layout_copy",
    "float_master_math_op",
    "float_master_inplace_op",
    "float_master_copy_op",
    "float_master_new_zeros_op",
    "FLOAT_MASTER_COLLECTIVE_OPS",
    "float_master_collective_op",
    "float_master_fsdp_pre_all_gather",
    "float_master_fsdp_post_all_gather",
]


def _op_name(op: Any) -> str:
    if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(op)
    return f"{getattr(op, '__module__', '') or ''}.{getattr(op, '__qualname__', repr(op))}".lstrip(".")


def unsupported_op_message(cls: type, op: Any) -> str:
    supported = ", ".join(cls.supported_ops())
    return f"{cls.__name__} does not support {_op_name(op)}; supported: {supported}"


class _BoundPreAllGather:
    """``weight.fsdp_pre_all_gather``: the hook bound to its weight. Each hook's subclass of this
    stores the bound signature (the hook's without ``self``) on the class."""

    __slots__ = ("fn", "weight")
    __signature__: inspect.Signature

    def __init__(self, fn: Callable, weight: Tensor):
        self.fn, self.weight = fn, weight

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.weight, *args, **kwargs)


class fsdp_pre_all_gather_hook:
    """Decorator for a weight's ``fsdp_pre_all_gather``. FSDP2 calls ``inspect.signature`` on the bound
    hook at every all-gather of every parameter (to pick its argument list). On a bound method that
    copies the function's signature without ``self``: ~17 µs a call on the 2-core CI machine, 48 calls
    a step for the anchor model of ``benchmarks/fsdp2.py``. Bound through this descriptor the hook is a
    small callable whose signature is stored on its class, which ``inspect.signature`` returns as is.
    On the class (``Cls.fsdp_pre_all_gather``) it is the descriptor, callable as the plain function."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__signature__ = inspect.signature(fn)
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        bound = self.__signature__.replace(parameters=list(self.__signature__.parameters.values())[1:])
        self.bound_type = type(f"Bound_{fn.__name__}", (_BoundPreAllGather,), {"__slots__": (), "__signature__": bound})

    def __get__(self, weight: Tensor | None, owner: type | None = None) -> Any:
        return self if weight is None else self.bound_type(self.fn, weight)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def check_weight(w: object, who: str) -> None:
    """The input checks every weight quantizer shares: a finite, non-empty, 2-D float tensor."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor weight, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{who}: weight must be floating point (float32/bfloat16/float16), got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{who}: weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{who}: weight is empty (shape {tuple(w.shape)})")
    if not torch.isfinite(w).all():
        raise ValueError(f"{who}: weight has NaN or Inf values")


class QuantTensor(Tensor):
    """Base class: a wrapper tensor whose logical value is ``self.dequantize()``.

    Outer ``shape`` is the logical float shape; outer ``dtype`` is the dtype of its gradient
    (the activation dtype); ``device`` is that of the inner tensors.
    """

    tensor_names: tuple[str, ...] = ()
    attr_names: tuple[str, ...] = ()
    _aten_table: dict[Any, Handler] = {}
    _fn_table: dict[Any, Handler] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Each class owns its tables; lookups walk the MRO, so a child inherits every entry of
        # its parents (even ones registered after it was defined) and can override any of them.
        cls._aten_table, cls._fn_table = {}, {}

    @classmethod
    def _lookup(cls, table: str, op: Any) -> Handler | None:
        # Memoized: FSDP2 and the optimizers send a few hundred torch functions a step through
        # __torch_function__ (``.size()``, ``.grad``...); a dict lookup instead of an MRO walk.
        key = (cls, table, op)
        try:
            return _RESOLVED[key]
        except KeyError:
            pass
        handler = None
        for klass in cls.__mro__:
            own = klass.__dict__.get(table)
            if own is not None and op in own:
                handler = own[op]
                break
        _RESOLVED[key] = handler
        return handler

    @staticmethod
    def __new__(cls, *tensors_and_attrs: Any, shape: torch.Size, dtype: torch.dtype, requires_grad: bool = False):
        first = tensors_and_attrs[0]
        return Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=first.device, requires_grad=requires_grad
        )

    def __init__(self, *tensors_and_attrs: Any, shape: torch.Size, dtype: torch.dtype, requires_grad: bool = False):
        names = self.tensor_names + self.attr_names
        if len(tensors_and_attrs) != len(names):
            raise TypeError(f"{type(self).__name__} takes {names}, got {len(tensors_and_attrs)} values")
        for name, value in zip(names, tensors_and_attrs):
            setattr(self, name, value)

    # ---- op tables -------------------------------------------------------------------------
    @classmethod
    def implements(cls, ops: Any | Iterable[Any]) -> Callable[[Handler], Handler]:
        """Register ``fn(func, types, args, kwargs)`` for aten ops and/or torch functions."""
        ops = list(ops) if isinstance(ops, (list, tuple)) else [ops]

        def decorator(fn: Handler) -> Handler:
            _RESOLVED.clear()  # a new entry may override what a subclass resolved to
            for op in ops:
                is_aten = isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
                (cls._aten_table if is_aten else cls._fn_table)[op] = fn
            return fn

        return decorator

    @classmethod
    def supported_ops(cls) -> list[str]:
        """Sorted names of every op in this class's tables (aten ops and torch functions)."""
        tables = [k.__dict__.get(t, {}) for k in cls.__mro__ for t in ("_aten_table", "_fn_table")]
        return sorted({_op_name(op) for table in tables for op in table})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = cls._lookup("_fn_table", func)
        if handler is not None:
            return handler(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = cls._lookup("_aten_table", func) or cls._lookup("_aten_table", func.overloadpacket)
        if handler is None:
            raise NotImplementedError(unsupported_op_message(cls, func))
        return handler(func, types, args, kwargs)

    # ---- the contract with torch.compile / FSDP2 -------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        attrs = {name: getattr(self, name) for name in self.attr_names}
        attrs["_outer_dtype"] = self.dtype
        return list(self.tensor_names), attrs

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, Tensor], attrs: dict[str, Any], outer_size, outer_stride):
        attrs = dict(attrs)
        dtype = attrs.pop("_outer_dtype")
        values = [inner[n] for n in cls.tensor_names] + [attrs[n] for n in cls.attr_names]
        return cls(*values, shape=outer_size, dtype=dtype)

    def _stable_hash_for_caching(self) -> str:
        """Key for torch.compile's AOT cache: class, metadata and inner-tensor layouts (no values)."""
        inner = [(n, t.dtype, tuple(t.shape), t.stride(), t.device.type) for n, t in self._inner_tensors()]
        key = (type(self).__qualname__, tuple(self.shape), self.dtype, self.requires_grad, inner,
               [(n, repr(getattr(self, n))) for n in self.attr_names])  # fmt: skip
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def _inner_tensors(self) -> list[tuple[str, Tensor]]:
        return [(n, getattr(self, n)) for n in self.tensor_names]

    def _rebuild(self, fn: Callable[[Tensor], Tensor] = lambda t: t, **overrides: Any):
        """A new tensor of this class: ``fn`` applied to every inner tensor, outer fields overridable."""
        values = [overrides.pop(n, None) if n in overrides else fn(getattr(self, n)) for n in self.tensor_names]
        values += [overrides.pop(n) if n in overrides else getattr(self, n) for n in self.attr_names]
        shape = overrides.pop("shape", self.shape)
        dtype = overrides.pop("dtype", self.dtype)
        if overrides:
            raise TypeError(f"unknown fields {sorted(overrides)} for {type(self).__name__}")
        return type(self)(*values, shape=shape, dtype=dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize()")

    window_unit: str = "element"  # what a window must hold whole (named in errors): "row", "block"

    def _window(self, start: int, length: int, shape: torch.Size, op: str) -> QuantTensor:
        """Elements ``[start, start + length)`` of the flat logical tensor, as a real view shaped ``shape``.

        Layouts that keep their elements in flat order implement this and opt into WINDOW_OPS; raise
        ``NotImplementedError`` naming ``op`` when the window does not fit the layout.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support {op}")

    def requantize_(self, value: Tensor) -> QuantTensor:
        """Write a float ``value`` of this shape into this tensor (the write-back of in-place math)."""
        raise NotImplementedError(f"{type(self).__name__} does not support in-place updates (requantize_)")

    def _inner_repr(self) -> str:
        parts = [f"{n}={t.dtype}{list(t.shape)}" for n, t in self._inner_tensors()]
        parts += [f"{n}={getattr(self, n)!r}" for n in self.attr_names]
        return ", ".join(parts)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        # Never touch values here: torch.compile reprs fake subclass inputs while tracing.
        grad = ", requires_grad=True" if self.requires_grad else ""
        return (
            f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"{self._inner_repr()}{grad})"
        )

    @property
    def nbytes_packed(self) -> int:
        """Bytes held by the inner tensors (what the weight costs in memory)."""
        return sum(t.numel() * t.element_size() for _, t in self._inner_tensors())


# ---- ops every QuantTensor shares: they act on each inner tensor -----------------------------
@QuantTensor.implements([aten.detach.default, aten.alias.default])
def _detach(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0]._rebuild(func))


@QuantTensor.implements([aten.clone.default])
def _clone(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0]._rebuild(lambda t: t.clone()))


@QuantTensor.implements([aten._to_copy.default])
def _to_copy(func, types, args, kwargs):
    """``.to(device)`` moves the inner tensors; ``.to(dtype)`` changes the outer (gradient) dtype."""
    self = args[0]
    extra = set(kwargs) - {"dtype", "device", "non_blocking", "layout", "memory_format"}
    if extra:
        raise NotImplementedError(f"{type(self).__name__}.to() does not support {sorted(extra)}")
    dtype = kwargs.get("dtype") or self.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"{type(self).__name__} can only have a floating outer dtype, got {dtype}")
    device = kwargs.get("device")
    return self._rebuild(lambda t: t.to(device=device, non_blocking=kwargs.get("non_blocking", False)), dtype=dtype)


@QuantTensor.implements([aten.is_pinned.default])
def _is_pinned(func, types, args, kwargs):
    return all(t.is_pinned() for _, t in args[0]._inner_tensors())


@QuantTensor.implements([aten._pin_memory.default])
def _pin_memory(func, types, args, kwargs):
    return args[0]._rebuild(lambda t: t.pin_memory())


@QuantTensor.implements([torch._has_compatible_shallow_copy_type])
def _compatible_shallow_copy(func, types, args, kwargs):
    # nn.Module._apply asks this before `param.data = new`; a wrapper subclass cannot swap
    # its data that way, so say no and let it swap the Parameter instead.
    return False


@QuantTensor.implements([aten.zeros_like.default, aten.empty_like.default, aten.ones_like.default])
def _like(func, types, args, kwargs):
    # A new tensor shaped like a quantized one (optimizer state) is a plain tensor of its outer dtype.
    w = args[0]
    kwargs = {**kwargs, "dtype": kwargs.get("dtype") or w.dtype, "device": kwargs.get("device") or w.device}
    kwargs.pop("memory_format", None)
    return func(torch.empty(w.shape, dtype=kwargs["dtype"], device=kwargs["device"]), *args[1:], **kwargs)


# ---- math ops: named sets a scheme opts into with @Cls.implements(SET)(handler) -------------
# Out-of-place arithmetic reads the value and returns a plain tensor: it is how optimizers read a
# weight or a state (`grad.add(param, alpha=wd)`, `exp_avg_sq.sqrt()`); the result is not quantized.
DEQUANTIZING_OPS = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
    aten.neg.default, aten.sign.default, aten.abs.default, aten.sqrt.default, aten.maximum.default,
]  # fmt: skip

# In-place arithmetic is the update path of torch's optimizers: dequantize, apply in fp32, write
# back with the destination's ``requantize_`` (one rounding per op).
REQUANTIZING_INPLACE_OPS = [
    aten.add_.Tensor, aten.add_.Scalar, aten.sub_.Tensor, aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor,
    aten.addcdiv_.default, aten.addcmul_.default, aten.lerp_.Scalar, aten.lerp_.Tensor,
]  # fmt: skip

# torch's optimizers with foreach=True (their default for CUDA and DTensor params) send the list
# form of the same math: it is applied tensor by tensor, so each quantized one takes the path above.
FOREACH_OPS = [
    aten._foreach_add_.Scalar, aten._foreach_add_.List, aten._foreach_add_.Tensor, aten._foreach_add_.ScalarList,
    aten._foreach_sub_.Scalar, aten._foreach_sub_.List, aten._foreach_sub_.ScalarList,
    aten._foreach_mul_.Scalar, aten._foreach_mul_.List, aten._foreach_mul_.Tensor, aten._foreach_mul_.ScalarList,
    aten._foreach_div_.Scalar, aten._foreach_div_.List, aten._foreach_div_.ScalarList,
    aten._foreach_addcdiv_.Scalar, aten._foreach_addcdiv_.ScalarList, aten._foreach_addcdiv_.Tensor,
    aten._foreach_addcmul_.Scalar, aten._foreach_addcmul_.ScalarList, aten._foreach_addcmul_.Tensor,
    aten._foreach_lerp_.Scalar, aten._foreach_lerp_.List, aten._foreach_copy_.default,
    aten._foreach_add.Scalar, aten._foreach_add.List, aten._foreach_mul.Scalar, aten._foreach_mul.List,
    aten._foreach_sub.List, aten._foreach_neg.default,
]  # fmt: skip


def _value(x: Any) -> Any:
    return x.dequantize() if isinstance(x, QuantTensor) else x


def dequantizing_op(func, types, args, kwargs):
    """Handler for DEQUANTIZING_OPS: the op on the dequantized operands, a plain result."""
    return func(*map(_value, args), **{k: _value(v) for k, v in kwargs.items()})


def requantizing_inplace_op(func, types, args, kwargs):
    """Handler for REQUANTIZING_INPLACE_OPS: fp32 math on the value, then ``requantize_``."""
    dst, operands = args[0], list(map(_value, args[1:]))
    if not isinstance(dst, QuantTensor):  # a plain tensor updated with a quantized operand
        return func(dst, *operands, **kwargs)
    value = dst.dequantize(torch.float32)
    func(value, *operands, **kwargs)
    dst.requantize_(value)
    return dst


def foreach_op(func, types, args, kwargs):
    """Handler for FOREACH_OPS: the per-tensor op on each tensor of the list."""
    name = func.overloadpacket.__name__.removeprefix("_foreach_")  # e.g. "addcdiv_"
    tensors, rest = args[0], args[1:]
    n = len(tensors)

    def nth(a, i):
        # A per-tensor list (or a list of scalars) gives its i-th entry; anything else is shared.
        return a[i] if isinstance(a, (list, tuple)) and len(a) == n else a

    out = []
    for i, t in enumerate(tensors):
        a, kw = [nth(x, i) for x in rest], {k: nth(v, i) for k, v in kwargs.items()}
        if name in ("addcdiv_", "addcmul_") and len(a) == 3:  # per-tensor values, a list or a [n] tensor
            value = a.pop()
            kw["value"] = value[i].item() if isinstance(value, Tensor) else value
        out.append(getattr(t, name)(*a, **kw))
    return None if name.endswith("_") else out


# ---- windows: view / as_strided / slice / split as real views of a flat-order layout ----------
# FSDP2 shards a parameter with split/narrow on dim 0, pads with new_zeros, flattens with
# view(-1) and restores it with as_strided: each is a window of the flat tensor, a real view
# wherever the class's ``_window`` accepts it (whole rows or blocks), a clear error otherwise.
WINDOW_OPS = [
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.as_strided.default,
    aten.slice.Tensor, aten.split.Tensor,
]  # fmt: skip


def _slice_args(args: tuple, kwargs: dict) -> tuple[int, int | None, int | None, int]:
    """(dim, start, end, step) of an ``aten.slice.Tensor`` call."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    return dim, start, end, step


def _dim0_window(w: QuantTensor, start: int, end: int, op: str) -> QuantTensor:
    n, inner = w.shape[0], math.prod(w.shape[1:])
    start = max(0, min(start + n if start < 0 else start, n))
    end = max(start, min(end + n if end < 0 else end, n))
    return w._window(start * inner, (end - start) * inner, torch.Size((end - start, *w.shape[1:])), op)


def window_op(func, types, args, kwargs):
    """Handler for WINDOW_OPS on a class that implements ``_window``."""
    w, name = args[0], type(args[0]).__name__
    if func.overloadpacket is aten.split:
        size, dim = args[1], args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if dim != 0:
            raise NotImplementedError(f"{name}: split supports dim 0 (whole {w.window_unit}s), got dim={dim}")
        return [_dim0_window(w, s, s + size, "split") for s in range(0, w.shape[0], size)]
    if func.overloadpacket is aten.slice:
        dim, start, end, step = _slice_args(args, kwargs)
        if dim != 0 or step != 1:
            raise NotImplementedError(
                f"{name}: slice supports dim 0 with step 1 (whole {w.window_unit}s), got dim={dim}, step={step}"
            )
        out = _dim0_window(w, start or 0, w.shape[0] if end is None else end, "slice")
    elif func is aten.as_strided.default:
        size, stride = args[1], args[2]
        offset = args[3] if len(args) > 3 else kwargs.get("storage_offset") or 0
        numel = math.prod(size)
        if list(stride) != list(torch.empty(size, device="meta").stride()) or offset + numel > w.numel():
            raise NotImplementedError(
                f"{name}: as_strided supports contiguous {w.window_unit}-aligned windows only, got "
                f"size={list(size)} stride={list(stride)} offset={offset} on shape {list(w.shape)}"
            )
        out = w._window(offset, numel, torch.Size(size), "as_strided")
    else:  # view, _unsafe_view, reshape
        shape = torch.empty(w.shape, device="meta").view(args[1]).shape  # resolves -1, checks numel
        out = w._window(0, w.numel(), shape, "view")
    return return_and_correct_aliasing(func, args, kwargs, out)


# ---- layouts without flat windows: row slices, same-shape views, same-layout copies ----------
def row_slice_range(w: QuantTensor, args: tuple, kwargs: dict) -> range:
    """The rows an ``aten.slice.Tensor`` call selects (clamped like aten), or a clear error."""
    dim, start, end, step = _slice_args(args, kwargs)
    if dim not in (0, -2) or step != 1:
        raise NotImplementedError(
            f"{type(w).__name__}: slice supports dim 0 with step 1 (whole rows), got dim={dim}, step={step}"
        )
    return range(w.shape[0])[slice(start, end)]


def row_slice_op(func, types, args, kwargs):
    """Handler for ``aten.slice.Tensor`` on a 2-D layout whose inner tensors all have rows on dim 0."""
    w = args[0]
    rows = row_slice_range(w, args, kwargs)
    out = w._rebuild(lambda t: t[rows.start : rows.stop], shape=torch.Size((len(rows), w.shape[1])))
    return return_and_correct_aliasing(func, args, kwargs, out)


def same_shape_view_op(func, types, args, kwargs):
    """Handler for ``view`` on a layout that cannot be reshaped: the same shape only (``-1`` allowed)."""
    w, size = args[0], args[1]
    if torch.empty(w.shape, device="meta").view(size).shape != w.shape:
        raise NotImplementedError(
            f"{type(w).__name__}: view supports the same shape only ({list(w.shape)}), got {list(size)}"
        )
    return return_and_correct_aliasing(func, args, kwargs, w._rebuild(lambda t: t.view(t.shape)))


def same_layout_copy(build_hint: str) -> Handler:
    """A ``copy_`` handler for formats that do not quantize a float value in place.

    quantized -> plain writes the value; quantized -> quantized of one layout (shape, attributes,
    inner shapes) copies every inner tensor; plain -> quantized raises, naming ``build_hint``.
    """

    def layout(t: QuantTensor) -> tuple:
        return (tuple(t.shape), *(getattr(t, n) for n in t.attr_names), *(tuple(x.shape) for _, x in t._inner_tensors()))

    def copy_(func, types, args, kwargs):
        dst, src = args[0], args[1]
        if not isinstance(dst, QuantTensor):  # a plain tensor reads the value
            return dst.copy_(src.dequantize(dst.dtype))
        name = type(dst).__name__
        if type(src) is not type(dst):
            raise NotImplementedError(
                f"{name}: copy_ of a plain tensor into a quantized one is not supported; build one with {build_hint}"
            )
        if layout(src) != layout(dst):
            raise ValueError(f"{name}.copy_: layouts differ: {layout(src)} into {layout(dst)}")
        for (_, d), (_, t) in zip(dst._inner_tensors(), src._inner_tensors()):
            d.copy_(t)
        return dst

    return copy_


# ---- layouts whose value is a float master weight (``float_data``) ----------------------------
# Training schemes that quantize only inside their matmuls (int8 mixed precision, BitNet) keep the
# weight itself in float: optimizer math acts on it directly, with no requantization.
def _float_data(t: Any) -> Any:
    return t.float_data if isinstance(t, QuantTensor) and "float_data" in t.tensor_names else t


def float_master_math_op(func, types, args, kwargs):
    """Handler for DEQUANTIZING_OPS: out-of-place math (how optimizers read a weight) on the float data."""
    return func(*tree_map(_float_data, args), **tree_map(_float_data, kwargs))


def float_master_inplace_op(func, types, args, kwargs):
    """Handler for REQUANTIZING_INPLACE_OPS + FOREACH_OPS: in place on the float data.

    The optimizer's update lands in the master weight itself; foreach lists keep their fast path
    (one call over all tensors, this weight's float data among them).
    """
    out = func(*tree_map(_float_data, args), **tree_map(_float_data, kwargs))
    return args[0] if isinstance(args[0], QuantTensor) else out


def float_master_copy_op(func, types, args, kwargs):
    """Handler for ``copy_``: into the float data, or a plain tensor reading it."""
    dst, src = args[0], args[1]
    if isinstance(dst, QuantTensor):
        dst.float_data.copy_(_float_data(src))
    else:
        dst.copy_(_float_data(src))
    return dst


def float_master_new_zeros_op(func, types, args, kwargs):
    """Handler for ``new_zeros`` (FSDP2 builds each rank's padded shard with it): zero float data."""
    w = args[0]
    data = torch.zeros(args[1], dtype=w.float_data.dtype, device=kwargs.get("device") or w.device)
    return w._rebuild(float_data=data, shape=data.shape, dtype=kwargs.get("dtype") or w.dtype)


if torch.distributed.is_available():
    _c10d = torch.ops._c10d_functional
    FLOAT_MASTER_COLLECTIVE_OPS = [
        _c10d.all_gather_into_tensor.default,
        _c10d.wait_tensor.default,
        _c10d._wrap_tensor_autograd.default,
    ]
else:  # pragma: no cover - torch builds without distributed
    FLOAT_MASTER_COLLECTIVE_OPS = []


def float_master_collective_op(func, types, args, kwargs):
    """Handler for the functional collectives ``DTensor.full_tensor`` sends: gather the float data,
    keep the class. The all-gather waits here: the wrapper handed back is not an AsyncCollectiveTensor."""
    w = args[0]
    if func is _c10d._wrap_tensor_autograd.default:
        return w
    if func is _c10d.wait_tensor.default:
        return w._rebuild(float_data=func(w.float_data))
    data = _c10d.wait_tensor(func(w.float_data.contiguous(), *args[1:], **kwargs)).view(-1, *w.shape[1:])
    return w._rebuild(float_data=data, shape=data.shape)


# FSDP2 extension for a float master weight: all-gather the float data cast to the mixed-precision
# param dtype, rebuild the full weight of the same class.
#   fully_shard: weight --split/narrow/new_zeros/view (dim 0)--> local shard (the class)
#   forward:     pre_all_gather -> float_data.to(param_dtype) [padded] --all-gather--> post
#                -> full weight (the class) --as_strided (drops the padding)--> F.linear
# A weight that all-gathers several tensors (codes and scales) meets a shortcut of FSDP2 at world size
# 1 (torch 2.11-2.13, FSDPParamGroup.wait_for_unshard): no collective, and only the *first*
# all-gather input is copied into the unsharded parameter's buffer. There the other tensors travel in
# the metadata, and the post-all-gather hook copies them into storages of their own (FSDP2 frees and
# re-allocates the unsharded tensors' storages between steps: they must not alias the shard's).
def fsdp_all_gather_inputs(world: int, tensors: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], object]:
    """``(all-gather inputs, metadata)`` for ``fsdp_pre_all_gather``: ``tensors`` and None, or at world
    size 1 the first tensor and the others as metadata (see above)."""
    if world == 1 and len(tensors) > 1:
        return tensors[:1], ("world 1", tensors[1:])
    return tensors, None


def fsdp_gathered(outputs, metadata, out_inner: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...] | None:
    """The all-gathered tensors for ``fsdp_post_all_gather``: ``outputs``, with (world size 1) copies of
    the metadata's tensors after them. Later steps (``out_inner``: the unsharded weight's tensors after
    the first, whose storages FSDP2 re-allocated): refill those from the metadata; returns None."""
    rest = metadata[1] if metadata is not None else ()
    if out_inner is not None:
        for dst, src in zip(out_inner, rest):
            # as FSDP2 refills its own buffers: the forward's saved weight must not look modified
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(dst):
                dst.copy_(src)
        return None
    return (*outputs, *(t.clone() for t in rest))


@fsdp_pre_all_gather_hook
def float_master_fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
    param_dtype = getattr(mp_policy, "param_dtype", None) or self.float_data.dtype
    data = self.float_data.to(param_dtype)
    if outer_size is not None:  # uneven rows: FSDP2 wants every rank's input at the padded size
        padded_rows = -(-outer_size[0] // mesh.size())
        if data.shape[0] < padded_rows:
            data = torch.cat([data, data.new_zeros(padded_rows - data.shape[0], *data.shape[1:])])
    return (data,), None


def float_master_fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
    (data,) = outputs
    if out is not None:  # later steps: FSDP2 refilled the storage `out` already views
        return None
    return self._rebuild(float_data=data, shape=data.shape, dtype=param_dtype), (data,)
