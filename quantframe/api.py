"""``quantize_``: swap the weights of a model for quantized tensors, in place.

Schemes register a handler per config type with :func:`register_quantize_handler`; this module
never names a scheme. A handler receives the module and the config and returns the new weight
tensor, or raises :class:`SkipModule` when the module's shape does not fit the scheme (the
module is then left alone and reported).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from quantframe.tensor import QuantTensor

logger = logging.getLogger("quantframe")

__all__ = ["QuantConfig", "SkipModule", "register_quantize_handler", "quantize_", "summary"]


@dataclass(frozen=True)
class QuantConfig:
    """Base of every config; subclasses are frozen dataclasses made by lower-case factories.

    A scheme whose weights never train (an inference format, a frozen QLoRA base) sets the class
    attribute ``frozen = True``: ``quantize_`` then gives the new weight ``requires_grad=False``.
    """

    frozen: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__


class SkipModule(Exception):
    """Raised by a handler: this module's shape does not fit the scheme; leave it dense."""


Handler = Callable[[nn.Module, QuantConfig], Tensor]
_HANDLERS: dict[type, Handler] = {}


def register_quantize_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(module, config) -> quantized weight`` for configs of ``config_type``."""
    if not (isinstance(config_type, type) and issubclass(config_type, QuantConfig)):
        raise TypeError(f"register_quantize_handler expects a QuantConfig subclass, got {config_type!r}")

    def decorator(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return decorator


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Quantize the weights of ``model`` in place, as ``config`` says.

    Every module that ``filter_fn(module, fqn)`` selects (default: every ``nn.Linear``) gets its
    ``weight`` replaced by an ``nn.Parameter`` holding the quantized tensor, with the same
    ``requires_grad`` (``False`` for a config with ``frozen = True``). Tied weights (one Parameter shared by several modules) stay tied: when
    all holders are selected they share one quantized Parameter; when one is not (e.g. an
    ``nn.Embedding`` tied to the output head), the weight is left dense and reported. Modules
    whose shape the scheme cannot take are skipped; one log line (logger ``"quantframe"``) says
    what was swapped and what was skipped and why, and :func:`summary` prints a table.

    Raises ``TypeError`` for a model that is not an ``nn.Module`` or a config with no registered
    handler, ``ValueError`` when a selected module has no weight, is already quantized or is
    already sharded (call ``quantize_`` before ``fully_shard``), and
    whatever the scheme raises for a weight it cannot take (NaN, wrong dtype or rank).

    Example::

        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        quantize_(model, int8_weight_only_quantized_training())
        print(summary(model))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS)) or "none"
        raise TypeError(f"quantize_: no handler for config {config!r}; registered configs: {known}")
    select = filter_fn or _default_filter

    modules = list(model.named_modules())
    selected = {fqn for fqn, module in modules if select(module, fqn)}
    owners: dict[int, list[str]] = {}  # id(parameter) -> every "module.name" holding it
    for fqn, module in modules:
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{fqn}.{name}" if fqn else name)

    swapped: dict[int, nn.Parameter] = {}  # id(old weight) -> new Parameter, keeps ties tied
    done, skipped = [], {}
    for fqn, module in modules:
        if fqn not in selected:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(
                f"quantize_: filter_fn selected {fqn or '<root>'} ({type(module).__name__}), "
                "which has no weight tensor"
            )
        if isinstance(weight, QuantTensor):
            raise ValueError(
                f"quantize_: {fqn or '<root>'}.weight is already a {type(weight).__name__}; "
                "quantize_ was already applied to this module"
            )
        if _is_dtensor(weight):
            raise ValueError(
                f"quantize_: {fqn or '<root>'}.weight is a DTensor; call quantize_ before fully_shard"
            )
        me = f"{fqn}.weight" if fqn else "weight"
        untied = [o for o in owners[id(weight)] if o != me and o.rsplit(".", 1)[0] not in selected]
        if untied:
            skipped[fqn] = f"weight is tied to {', '.join(untied)}, which is not selected; quantizing would untie them"
            continue
        if id(weight) in swapped:
            module.weight = swapped[id(weight)]
            done.append(fqn)
            continue
        try:
            with torch.no_grad():
                new = handler(module, config)
        except SkipModule as why:
            skipped[fqn] = str(why)
            continue
        param = nn.Parameter(new, requires_grad=weight.requires_grad and not config.frozen)
        module.weight = param
        swapped[id(weight)] = param
        done.append(fqn)

    prior = getattr(model, "_quantframe_skipped", {})
    model._quantframe_skipped = {**prior, **skipped}
    logger.info(
        "quantize_(%s): quantized %d weights, skipped %d%s",
        config.name,
        len(done),
        len(skipped),
        "".join(f"\n  skipped {k}: {v}" for k, v in skipped.items()),
    )


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary(model: nn.Module) -> str:
    """A table of the model's quantized weights (name, format, shape, bytes) and what was skipped."""
    rows = [("name", "format", "shape", "bytes")]
    q_bytes = dense_bytes = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        local = p.to_local() if hasattr(p, "to_local") else p
        if id(p) in seen:
            if isinstance(local, QuantTensor):
                rows.append((name, f"tied to {type(local).__name__}", "", ""))
            continue
        seen.add(id(p))
        if isinstance(local, QuantTensor):
            rows.append((name, type(local).__name__, "x".join(map(str, p.shape)), _format_bytes(local.nbytes_packed)))
            q_bytes += local.nbytes_packed
        else:
            dense_bytes += local.numel() * local.element_size()
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"quantized: {_format_bytes(q_bytes)}   dense parameters: {_format_bytes(dense_bytes)}")
    for fqn, why in getattr(model, "_quantframe_skipped", {}).items():
        lines.append(f"skipped {fqn}: {why}")
    return "\n".join(lines)
