"""Branches of the kernel launch code that only a GPU takes, driven on CPU through the Triton interpreter.

On a GPU every launch without a fixed config goes through Triton's autotuner (which times each candidate config on
the real output buffer, zeroing the split-K partials between runs with ``reset_to_zero``) and splits K for 132 SMs;
the interpreter otherwise runs only the first config with a 4-SM split. Here the real autotuner runs every config
under the interpreter with a CPU timer, each config's output is checked against torch, and launches are planned
for an H100's SM count.
"""

import pytest
import torch
from llmsparse.kernels import _triton

from llmsparse.core.errors import LlmsparseError

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


def make_weight(fmt, rows, cols, dtype=torch.bfloat16, seed=0):
    from llmsparse.kernels import formats as F
    from llmsparse.kernels.balanced import balanced_mask

    from llmsparse.pruning.masks import nm_mask, topk_row_mask

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scores = torch.rand(rows, cols, generator=g)
    if fmt == "2:4":
        return F.compress(w.to(dtype), nm_mask(scores, 2, 4), "2:4")
    if fmt == "bitmap":  # the real default tile, so the GPU's own candidate configs apply
        return F.compress(w.to(dtype), topk_row_mask(scores, 0.7), "bitmap", tile=(64, 64))
    return F.compress(w.to(dtype), balanced_mask(scores, 0.7, 27), "balanced:8:27")


def reference(x, weight, bias):
    return x.double() @ weight.decompress().double().T + bias.double()


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def autotuned(x, weight, bias, path, sms=4):
    """Plan ``path``, then run it through Triton's autotuner with a CPU timer that records every config's output.

    The timer runs each config twice, like ``do_bench``'s repeated calls, and makes the last config the fastest so
    that the final launch uses a config other than the first.
    """
    import dataclasses

    from llmsparse.kernels import ops

    launch = ops.plan(x, weight, bias, path, None, sms)
    runs = []

    def bench(kernel_call, quantiles):
        outs = []
        for _ in range(2):
            kernel_call()
            outs.append(launch.out.clone())
        runs.append(outs)
        return [float(len(launch.tuner.configs) - len(runs) + 1)] * len(quantiles)

    launch.tuner = dataclasses.replace(launch.tuner, do_bench=bench, _tuned=None)
    return launch, runs


CASES = [("2:4", "gemv", 1), ("2:4", "skinny", 5), ("2:4", "tiled", 70), ("bitmap", "gemv", 1),
         ("bitmap", "skinny", 5), ("bitmap", "tiled", 70), ("balanced", "gemv", 1)]


@pytest.mark.parametrize("fmt,path,m", CASES)
def test_every_autotune_config_matches_torch_and_split_k_partials_are_reset_between_runs(fmt, path, m):
    # Not multiples of any block; long enough to split K (a balanced split holds at least 2 x 512 stored values).
    rows, cols = 40, 300 if path == "tiled" else 7000 if fmt == "balanced" else 2144
    weight = make_weight(fmt, rows, cols)
    x = torch.randn(m, cols).to(torch.bfloat16)
    bias = torch.randn(rows).to(torch.bfloat16)
    ref = reference(x, weight, bias)
    launch, runs = autotuned(x, weight, bias, path)
    y = launch.run()
    configs = launch.tuner.configs
    assert len(runs) == len(configs) > 1  # the autotuner timed every candidate
    for config, (first, second) in zip(configs, runs):
        assert rel(first, ref) < 1e-2, config
        assert torch.equal(first, second), config  # the second run started from zeroed partials
    assert launch.tuner._tuned.best_config.kwargs == {k: v for k, v in configs[-1].items()
                                                      if k not in ("num_warps", "num_stages")}
    assert y.dtype == x.dtype and rel(y, ref) < 1e-2
    if path != "tiled":
        assert launch.atomic  # K really was split: partial sums met by atomic adds


def test_without_reset_to_zero_the_split_partials_would_pile_up():
    """The check above can fail: with no reset the second run of a config adds onto the first."""
    import dataclasses

    weight = make_weight("2:4", 40, 2144)
    x = torch.randn(1, 2144).to(torch.bfloat16)
    bias = torch.randn(40).to(torch.bfloat16)
    launch, runs = autotuned(x, weight, bias, "gemv")
    launch.tuner = dataclasses.replace(launch.tuner, reset_to_zero=[])
    launch.run()
    first, second = runs[0]
    torch.testing.assert_close(second, 2 * first)


@pytest.mark.parametrize("fmt", ["2:4", "bitmap", "balanced"])
def test_h100_split_counts_run_correctly(fmt):
    """The split of K planned for 132 SMs (the interpreter otherwise plans for 4), run under the interpreter."""
    cols = 8192 if fmt == "balanced" else 4096
    weight = make_weight(fmt, 64, cols, seed=1)
    x = torch.randn(1, cols).to(torch.bfloat16)
    bias = torch.randn(64).to(torch.bfloat16)
    from llmsparse.kernels import ops

    launch = ops.plan(x, weight, bias, "gemv", None, sms=132)
    splits = launch.grid(launch.candidates()[0])[1]
    assert splits > 1
    assert rel(launch.run(), reference(x, weight, bias)) < 1e-2
