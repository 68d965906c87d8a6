"""Setup for the Triton kernel tests (interpreter mode, see test/conftest.py)."""

import pytest

from quantframe.testing import patch_interpreter_loop_bounds


@pytest.fixture(autouse=True)
def _interpreter_loop_bounds():
    """The Triton 3.6 interpreter's loop bounds under numpy >= 2.4 (quantframe.testing)."""
    undo = patch_interpreter_loop_bounds()
    yield
    if undo is not None:
        undo()
