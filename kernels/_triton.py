"""Optional Triton and the launch plumbing shared by the kernels.

The package imports without Triton (macOS, CPU-only installs); kernels then refuse with a clear error and
``SparseLinear`` falls back to dense math. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which
is how CI checks them; the interpreter cannot benchmark, so it always runs the first candidate configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..core.errors import LlmsparseError

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.errors import InterpreterError
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = libdevice = None
    InterpreterError = RuntimeError

HAS_TRITON = triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    return HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def require(device: torch.device) -> None:
    if not HAS_TRITON:
        raise LlmsparseError("the sparse kernels need Triton (pip install triton, Linux with an NVIDIA GPU); "
                             "SparseLinear falls back to dense math without it")
    if not can_run(device):
        raise LlmsparseError(f"the Triton sparse kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
                             f"got a {device.type} tensor: use SparseLinear's dense fallback")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_k(row_blocks: int, k_len: int, sms: int, unit: int, min_units: int = 2) -> int:
    """Length of K each program covers (a multiple of ``unit``) so that about ``4 * sms`` programs run.

    Decode-size products have few row blocks; splitting K keeps every SM streaming weights. Each split keeps at
    least ``min_units`` steps of ``unit`` columns so the partial sums stay worth their atomic adds.
    """
    steps = -(-k_len // unit)
    splits = 1
    while row_blocks * splits < 4 * sms and steps // (splits * 2) >= min_units:
        splits *= 2
    return -(-steps // splits) * unit


# NumPy 2.4 made int() of a one-element array an error; Triton 3.6's interpreter does exactly that for every
# run-time scalar that reaches range() (triton-lang/triton#9171, fixed in later releases by a squeeze).
_NUMPY_SCALAR = "only 0-dimensional arrays can be converted to Python scalars"


def launch(kernel, grid, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)``, turning the Triton 3.6 interpreter's NumPy 2.4 failure into a clear error.

    Every loop with a run-time bound fails there, so no kernel construct avoids it short of giving up ``scf.for``
    (and with it software pipelining) on the GPU; the interpreter needs NumPy < 2.4 or a newer Triton instead.
    """
    try:
        kernel[grid](*args, **meta)
    except InterpreterError as e:
        if _NUMPY_SCALAR not in str(e):
            raise
        raise LlmsparseError(f"Triton {triton.__version__}'s interpreter cannot run loops with NumPy "
                             f"{_numpy_version()} (triton-lang/triton#9171): install 'numpy<2.4' or a newer Triton "
                             f"for TRITON_INTERPRET=1") from e


def _numpy_version() -> str:
    import numpy

    return numpy.__version__


@dataclass
class Tuner:
    """A Triton kernel with candidate configurations, autotuned per ``key`` on a GPU.

    ``configs`` are dicts of meta-parameters plus ``num_warps``/``num_stages``. A ``config`` passed at call time
    (tests, benchmarks of one variant) bypasses tuning. The interpreter runs ``configs[0]`` unless ``do_bench`` is
    given: Triton's own autotuner then times every config with it (``do_bench(kernel_call, quantiles)`` returning
    ``[median, ...]``), which is how tests drive the GPU's autotuning branch, ``reset_to_zero`` included, on CPU.
    """

    kernel: object
    configs: list
    key: list
    reset_to_zero: list = field(default_factory=list)
    do_bench: object = None
    _tuned: object = None

    def _autotuned(self):
        if self._tuned is None:
            configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                     num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))
                       for c in self.configs]
            self._tuned = triton.autotune(configs, key=self.key, reset_to_zero=self.reset_to_zero or None,
                                          do_bench=self.do_bench)(self.kernel)
        return self._tuned

    def __call__(self, grid, *args, config: dict | None = None, **kwargs) -> None:
        if config is None and ((interpreting() and self.do_bench is None) or len(self.configs) == 1):
            config = self.configs[0]
        if config is not None:
            meta = {**kwargs, **config}
            launch(self.kernel, grid(meta), args, meta)
        else:
            launch(self._autotuned(), grid, args, kwargs)


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs for ``tl.dot``: exact fp32 (not tf32) for fp32 inputs; bf16 upcast where the interpreter needs it.

    The interpreter computes dots with numpy, which has no bfloat16, so there the operands are widened to fp32
    (the products of bf16 values are exact in fp32, so the result is the same as a bf16 dot with fp32 accumulation).
    """
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": bool(interpreting() and dtype == torch.bfloat16)}


def hw_popc() -> bool:
    """Use the GPU's popcount instruction (the interpreter cannot call libdevice; it runs SWAR arithmetic)."""
    return not interpreting()
