"""Branches of the kernel launch code that only a GPU takes, driven on CPU through the Triton interpreter.

On a GPU every launch without a fixed config goes through Triton's autotuner (which times each candidate config on
the real output buffer, zeroing the split-K partials between runs with ``reset_to_zero``) and splits K for 132 SMs;
the interpreter otherwise runs only the first config with a 4-SM split. Here the real autotuner runs every config
under the interpreter with a CPU timer, each config's output is checked against torch, and launches are planned
for an H100's SM count.
"""

import pytest
import torch

from llmsparse.errors import LlmsparseError
from llmsparse.kernels import _triton

pytestmark = pytest.mark.skipif(not _triton.can_run(torch.device("cpu")) or torch.cuda.is_available(),
                                reason="CPU interpreter checks (TRITON_INTERPRET=1, set by conftest)")


def test_numpy_24_failure_of_the_triton_36_interpreter_becomes_a_clear_error():
    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise _triton.InterpreterError(repr(TypeError(_triton._NUMPY_SCALAR)))

            return run

    with pytest.raises(LlmsparseError, match=r"triton-lang/triton#9171.*numpy<2\.4"):
        _triton.launch(Kernel(), (1,), (), {})


def test_other_interpreter_errors_pass_through():
    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise _triton.InterpreterError("IndexError: out of bounds")

            return run

    with pytest.raises(_triton.InterpreterError, match="out of bounds"):
        _triton.launch(Kernel(), (1,), (), {})
