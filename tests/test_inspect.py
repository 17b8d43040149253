"""The kernels compile for Hopper (sm_90) without a GPU: the interpreter tests cannot catch GPU-only compile errors."""

import os
import subprocess
import sys

import pytest
from llmsparse.kernels import _triton


def inspect(*args):
    """Rows of the first table (one per variant) for the 2:4 and bitmap kernels."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-m", "llmsparse.kernels.inspect_kernels", "--formats", "2:4,bitmap",
                           *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.split("\n\n")[0]
    return [line for line in first.splitlines() if line.startswith(("| 2:4", "| bitmap"))]


@pytest.mark.slow  # ~30 s: four sm_90 compilations
@pytest.mark.skipif(not _triton.HAS_TRITON or not sys.platform.startswith("linux"),
                    reason="needs Triton's bundled ptxas (Linux wheel)")
def test_decode_and_tiled_kernels_compile_for_sm90():
    rows = inspect("--shapes", "128x256", "--m", "1,80", "--first")
    assert len(rows) == 4  # gemv and tiled, for 2:4 and bitmap
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1]) > 0 and int(cells[2]) == 0  # registers allocated, nothing in local memory
    assert all("HGMMA" in r for r in rows if " tiled " in r)  # Hopper wgmma for the large-M path
    assert all("128-bit" in r for r in rows if r.startswith("| 2:4") and " gemv " in r)  # 16-byte value loads


@pytest.mark.slow
@pytest.mark.skipif(not _triton.HAS_TRITON or not sys.platform.startswith("linux"),
                    reason="needs Triton's bundled ptxas (Linux wheel)")
def test_every_candidate_config_compiles_for_sm90_without_spilling_much():
    rows = inspect("--shapes", "4096x4096", "--m", "1,16,2048")
    assert len(rows) > 20
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[2]) == 0 and int(cells[3]) < 16, row
