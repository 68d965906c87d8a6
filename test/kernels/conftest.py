"""Setup for the Triton kernel tests (interpreter mode, see test/conftest.py)."""

import numpy as np
import pytest
import triton.runtime.interpreter as interpreter


@pytest.fixture(autouse=True)
def _interpreter_loop_bounds(monkeypatch):
    """numpy >= 2.4 refuses int() of a 1-element array, which the Triton 3.6 interpreter does for a
    runtime loop bound (`range(0, K, BLOCK_K)`): triton-lang/triton#9171. This applies the upstream
    fix; remove it once the pinned triton ships it."""
    if np.lib.NumpyVersion(np.__version__) < "2.4.0":
        return
    patch_lang_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
