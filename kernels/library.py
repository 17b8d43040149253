"""``llmsparse::sparse_linear``: ``y = x @ W.T + b`` from a compressed weight, as a ``torch.library`` custom op.

One op for every format, with a fake (meta) implementation and an autograd formula, so that ``torch.compile(model,
fullgraph=True)`` traces a sparsified model without a graph break at each sparse layer, CUDA graphs capture it, and
training on top of it (LoRA adapters, a new head) gets gradients through every sparse layer::

    llmsparse::sparse_linear(Tensor x, Tensor values, Tensor index, Tensor? extra, Tensor? bias, str fmt,
                             int[] shape, int[] params, str backend, bool cusparselt) -> Tensor
    llmsparse::decompress(Tensor values, Tensor index, Tensor? extra, str fmt, int[] shape, int[] params) -> Tensor

The weight is its format's tensors and static metadata (``op_args``): ``fmt`` ``"nm"`` (``index`` = indices),
``"bitmap"`` (``index`` = bitmap, ``extra`` = offsets) or ``"balanced"`` (``index`` = lo, ``extra`` = hi or None);
``shape`` = ``[out, in]``; ``params`` = ``[n, m]``, ``[tile rows, tile cols]`` or ``[keep, block]``. ``x`` must have
the weight's dtype (``SparseLinear`` casts it).

The backend is chosen inside the op, at run time (``route``), so nothing of it enters a traced graph: the Triton
kernels on CUDA (decode sizes; for larger M the fastest of them, torch's 2:4 semi-structured path and cuBLAS on a
transient dense copy, timed once per shape by ``dispatch``), exact dense math on the decompressed weight elsewhere;
``backend`` ``"triton"``, ``"dense"`` or ``"cusparselt"`` forces one (``"triton"`` runs on CPU under
``TRITON_INTERPRET=1``). During CUDA graph capture nothing is timed (see ``dispatch``).

Autograd: the gradient of ``x`` is ``grad_out @ W`` with ``W`` decompressed by ``llmsparse::decompress`` (there is
no transposed sparse kernel yet), the gradient of ``bias`` is ``grad_out`` summed over rows. The compressed tensors
are frozen: asking for their gradient is refused (train the dense weight after ``densify``, or adapters).
"""

import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import LlmsparseError
from . import _triton, dispatch
from .formats import BalancedWeight, BitmapWeight, NMWeight

BACKENDS = ("auto", "triton", "dense", "cusparselt")
# Per format: the module's buffer names passed as ``index`` and ``extra``.
OP_TENSORS = {"nm": ("indices", None), "bitmap": ("bitmap", "offsets"), "balanced": ("lo", "hi")}
# Largest M the balanced gemv (its only kernel, one program column per x row) is timed against dense math for.
BALANCED_GEMV_MAX_M = 64

FROZEN = ("the compressed weight of a SparseLinear is frozen (its tensors are buffers, not parameters): no gradient "
          "flows into it. To train the weight itself, densify(model) and train the dense Linear (a SparsityCallback "
          "keeps the zeros), or train adapters (LoRA) on top of the sparse layers")


def op_params(meta: dict) -> list[int]:
    """The op's ``params`` of a format's ``to_tensors`` metadata."""
    kind = meta["format"]
    if kind == "nm":
        return [int(meta["n"]), int(meta["m"])]
    if kind == "bitmap":
        return [int(v) for v in meta["tile"]]
    if kind == "balanced":
        return [int(meta["keep"]), int(meta["block"])]
    raise LlmsparseError(f"no sparse_linear op for format {kind!r}")


def op_args(weight) -> tuple:
    """``(values, index, extra, fmt, shape, params)`` of a format object: the op's weight arguments."""
    tensors, meta = weight.to_tensors()
    index, extra = OP_TENSORS[meta["format"]]
    return (tensors["values"], tensors[index], tensors.get(extra) if extra else None, meta["format"],
            list(weight.shape), op_params(meta))


def weight_from(values: torch.Tensor, index: torch.Tensor, extra: Optional[torch.Tensor], fmt: str,
                shape: Sequence[int], params: Sequence[int]):
    """The format object over the op's weight arguments (no copy, no validation: the module validated them)."""
    rows, cols = (int(v) for v in shape)
    a, b = (int(v) for v in params)
    if fmt == "nm":
        return NMWeight(values, index, (rows, cols), a, b)
    if fmt == "bitmap":
        return BitmapWeight(values, index, extra, (rows, cols), (a, b))
    if fmt == "balanced":
        return BalancedWeight(values, index, extra, (rows, cols), a, b)
    raise LlmsparseError(f"unknown sparse format {fmt!r} for llmsparse::sparse_linear: nm, bitmap or balanced")


# torch's semi-structured copy of a 2:4 weight, built only when the large-M timing considers or chose it:
# id(values) -> (weak reference to values, values._version, copy or None).
_SEMI: dict = {}


def _semi(weight):
    """The semi-structured (cuSPARSELt) copy of a 2:4 weight, or None where that path cannot run (cached)."""
    values = weight.values
    key = id(values)
    hit = _SEMI.get(key)
    if hit is not None and hit[0]() is values and hit[1] == values._version:
        return hit[2]

    def forget(ref, key=key):
        if _SEMI.get(key, (None,))[0] is ref:
            del _SEMI[key]

    semi = dispatch.semi_structured(weight.decompress())
    _SEMI[key] = (weakref.ref(values, forget), values._version, semi)
    return semi


def _semi_candidate(weight, cusparselt: bool) -> bool:
    return cusparselt and isinstance(weight, NMWeight) and (weight.n, weight.m) == (2, 4) and \
        _semi(weight) is not None


def run(backend: str, x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ W.T + bias`` on one backend (``triton``, ``dense`` or ``cusparselt``)."""
    if backend == "dense":
        return F.linear(x, weight.decompress(), bias)
    if backend == "cusparselt":
        semi = _semi(weight) if isinstance(weight, NMWeight) and (weight.n, weight.m) == (2, 4) else None
        if semi is None:
            raise LlmsparseError("torch's semi-structured (cuSPARSELt) path cannot run this weight: it needs a 2:4 "
                                 "weight in fp16/bf16 on a CUDA GPU with sparse tensor cores")
        return F.linear(x, semi, bias)
    if backend == "triton":
        from .ops import KernelWeight, sparse_linear

        return sparse_linear(x, KernelWeight(weight), bias)
    raise LlmsparseError(f"unknown SparseLinear backend {backend!r}: use one of {', '.join(BACKENDS)}")


def _kernels_fast_here(device: torch.device) -> bool:
    """Whether the auto route considers the kernels: on CUDA (the interpreter checks kernels, it is no CPU path)."""
    return device.type == "cuda" and _triton.can_run(device)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def route(x: torch.Tensor, weight, bias: Optional[torch.Tensor], backend: str = "auto",
          cusparselt: bool = True) -> str:
    """The backend ``x @ W.T + bias`` runs on (``backend`` itself unless ``"auto"``), timing candidates if needed.

    Auto: dense math off CUDA (the interpreter checks kernels, it is no fast CPU path). On CUDA: 2:4 and bitmap
    take the Triton kernels up to ``SKINNY_MAX_M`` rows and the timed fastest above; the balanced gemv takes M = 1,
    is timed against dense math up to ``BALANCED_GEMV_MAX_M`` and leaves larger M to dense math (it has no
    ``tl.dot`` path). During CUDA graph capture nothing is timed (an undecided shape takes Triton) and a bitmap's
    dense choice becomes Triton (decompressing a bitmap synchronises; 2:4 and balanced decompress without).
    """
    if backend != "auto":
        return backend
    if not _kernels_fast_here(x.device):
        return "dense"
    from .ops import SKINNY_MAX_M, _next_pow2

    m = x.numel() // max(weight.shape[1], 1)
    balanced = isinstance(weight, BalancedWeight)
    if m <= (1 if balanced else SKINNY_MAX_M):
        return "triton"
    if balanced and m > BALANCED_GEMV_MAX_M:
        choice = "dense"
    else:
        key = (weight.FORMAT, *weight.shape, str(x.dtype), str(x.device), _next_pow2(m))
        choice = dispatch.decided(key)
        if choice is None and _capturing():
            return "triton"  # nothing is timed or copied during a capture: warm up before capturing
        if choice is None:
            x2 = x.reshape(-1, weight.shape[1])
            candidates = {"triton": lambda: run("triton", x2, weight, bias),
                          "dense": lambda: run("dense", x2, weight, bias)}
            if _semi_candidate(weight, cusparselt):
                candidates["cusparselt"] = lambda: run("cusparselt", x2, weight, bias)
            choice = dispatch.choose(key, candidates, x.device)
            if choice != "cusparselt":
                _SEMI.pop(id(weight.values), None)
        if choice == "cusparselt" and not _semi_candidate(weight, cusparselt):  # another module's decision
            timings = dispatch.choices()[key][1]
            choice = min((b for b in timings if b != "cusparselt"), key=timings.get, default="triton")
    if choice == "dense" and isinstance(weight, BitmapWeight) and _capturing():
        return "triton"  # decompressing a bitmap synchronises (boolean-mask indexing), which a capture forbids
    return choice


@torch.library.custom_op("llmsparse::decompress", mutates_args=())
def decompress(values: torch.Tensor, index: torch.Tensor, extra: Optional[torch.Tensor], fmt: str,
               shape: Sequence[int], params: Sequence[int]) -> torch.Tensor:
    """The dense ``[out, in]`` weight (exactly ``W * mask``) of the op's weight arguments."""
    return weight_from(values, index, extra, fmt, shape, params).decompress()


@decompress.register_fake
def _decompress_fake(values, index, extra, fmt, shape, params):
    return values.new_empty((int(shape[0]), int(shape[1])))


@torch.library.custom_op("llmsparse::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, extra: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], fmt: str, shape: Sequence[int], params: Sequence[int],
                  backend: str = "auto", cusparselt: bool = True) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x [..., in]`` of the weight's dtype (see module doc)."""
    if x.dtype != values.dtype:
        raise LlmsparseError(f"llmsparse::sparse_linear: input dtype {x.dtype} must equal the weight dtype "
                             f"{values.dtype}: cast the input")
    weight = weight_from(values, index, extra, fmt, shape, params)
    out = run(route(x, weight, bias, backend, cusparselt), x, weight, bias)
    # the fake's layout: a compiled graph may rely on it (torch's semi-structured product can return a transpose)
    return out.to(x.dtype).contiguous()


@sparse_linear.register_fake
def _sparse_linear_fake(x, values, index, extra, bias, fmt, shape, params, backend="auto", cusparselt=True):
    torch._check(x.shape[-1] == int(shape[1]), lambda: f"input has {x.shape[-1]} features, the weight takes {shape[1]}")
    torch._check(x.dtype == values.dtype, lambda: f"input dtype {x.dtype} differs from the weight dtype {values.dtype}")
    return x.new_empty((*x.shape[:-1], int(shape[0])))


def _setup_context(ctx, inputs, output):
    x, values, index, extra, bias, fmt, shape, params, backend, cusparselt = inputs
    ctx.save_for_backward(values, index, extra)
    ctx.weight_meta = (fmt, list(shape), list(params))


def _backward(ctx, grad):
    if any(ctx.needs_input_grad[1:4]):
        raise LlmsparseError(FROZEN)
    values, index, extra = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ decompress(values, index, extra, *ctx.weight_meta)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)
