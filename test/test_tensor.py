"""The QuantTensor base: per-class op tables, errors, flatten/unflatten, repr."""

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline

from quantframe.tensor import QuantTensor

aten = torch.ops.aten


class Halves(QuantTensor):
    """A toy scheme for the tests: value = 0.5 * codes."""

    tensor_names = ("codes",)
    attr_names = ("tag",)

    def dequantize(self, dtype=None):
        return (self.codes.float() * 0.5).to(dtype or self.dtype)


class Child(Halves):
    pass


@Halves.implements([F.linear])
def _halves_linear(func, types, args, kwargs):
    return F.linear(args[0], args[1].dequantize(args[0].dtype))


@Child.implements(aten.clone.default)
def _child_clone(func, types, args, kwargs):
    return args[0]._rebuild(lambda t: t.clone(), tag="cloned by Child")


def halves(tag="t", cls=Halves):
    codes = torch.arange(6, dtype=torch.int8).view(2, 3)
    return cls(codes, tag, shape=codes.shape, dtype=torch.float32)


def test_tables_are_per_class_and_inherited():
    assert Halves._lookup("_fn_table", F.linear) is _halves_linear
    assert Child._lookup("_fn_table", F.linear) is _halves_linear  # registered on the parent after Child existed
    assert Halves._lookup("_aten_table", aten.clone.default) is not _child_clone
    assert halves(cls=Child).clone().tag == "cloned by Child"  # overridden in the child only
    assert halves().clone().tag == "t"


def test_lookups_see_entries_registered_after_them():
    # _lookup is memoized; a registration must not leave a stale answer (None, or the parent's handler)
    class Late(Halves):
        pass

    assert Late._lookup("_aten_table", aten.exp.default) is None
    assert Late._lookup("_fn_table", F.linear) is _halves_linear

    def late_exp(func, types, args, kwargs):
        return args[0].dequantize().exp()

    def late_linear(func, types, args, kwargs):
        return F.linear(args[0], args[1].dequantize(args[0].dtype)) + 1

    Late.implements(aten.exp.default)(late_exp)
    Late.implements(F.linear)(late_linear)
    assert Late._lookup("_aten_table", aten.exp.default) is late_exp
    assert Late._lookup("_fn_table", F.linear) is late_linear
    assert Halves._lookup("_fn_table", F.linear) is _halves_linear  # the parent keeps its own
    torch.testing.assert_close(torch.exp(halves(cls=Late)), halves().dequantize().exp())


def test_torch_function_table_and_fallthrough():
    x = torch.ones(1, 3)
    torch.testing.assert_close(F.linear(x, halves()), x @ halves().dequantize().T)
    with pytest.raises(NotImplementedError, match=r"^Halves does not support aten\.mm\.default; supported: "):
        torch.mm(x, halves())


def test_missing_op_message_lists_supported_ops():
    with pytest.raises(NotImplementedError) as e:
        torch.exp(halves())
    assert_expected_inline(
        str(e.value),
        """Halves does not support aten.exp.default; supported: aten._pin_memory.default, aten._to_copy.default, aten.alias.default, aten.clone.default, aten.detach.default, aten.empty_like.default, aten.is_pinned.default, aten.ones_like.default, aten.zeros_like.default, torch._C._nn.linear, torch._VariableFunctionsClass._has_compatible_shallow_copy_type""",
    )


def test_flatten_carries_attrs_and_outer_dtype():
    h = halves().to(torch.bfloat16)
    names, attrs = h.__tensor_flatten__()
    assert names == ["codes"] and attrs == {"tag": "t", "_outer_dtype": torch.bfloat16}
    back = Halves.__tensor_unflatten__({"codes": h.codes}, attrs, h.shape, h.stride())
    assert back.dtype == torch.bfloat16 and back.tag == "t" and back.codes is h.codes


def test_repr_shows_layout_not_values():
    assert_expected_inline(
        repr(halves()),
        """Halves(shape=[2, 3], dtype=torch.float32, device=cpu, codes=torch.int8[2, 3], tag='t')""",
    )


def test_constructor_and_rebuild_check_their_fields():
    with pytest.raises(TypeError, match=r"Halves takes \('codes', 'tag'\), got 1 values"):
        Halves(torch.zeros(2, dtype=torch.int8), shape=(2,), dtype=torch.float32)
    with pytest.raises(TypeError, match=r"unknown fields \['nope'\] for Halves"):
        halves()._rebuild(nope=1)


def test_to_rejects_integer_outer_dtype_and_unknown_kwargs():
    with pytest.raises(TypeError, match="floating outer dtype, got torch.int32"):
        halves().to(torch.int32)
    with pytest.raises(NotImplementedError, match=r"\.to\(\) does not support \['pin_memory'\]"):
        torch.ops.aten._to_copy.default(halves(), pin_memory=False)


def test_stable_hash_depends_on_layout_not_values():
    a, b = halves(), halves()
    b.codes.add_(1)
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()
    assert a._stable_hash_for_caching() != halves(tag="other")._stable_hash_for_caching()
    assert a._stable_hash_for_caching() != a.to(torch.bfloat16)._stable_hash_for_caching()
