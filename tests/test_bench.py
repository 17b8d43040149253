"""The GPU benchmark scripts, checked end to end at tiny sizes on CPU (kernels in the Triton interpreter)."""

import json

import pytest
import torch
from llmsparse.kernels import _triton

from llmsparse.core.errors import LlmsparseError

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not _triton.can_run(torch.device("cpu")),
                                reason="CPU check of the scripts (needs TRITON_INTERPRET=1, set by conftest)")


def test_kernel_bench_checks_and_tabulates_every_column(tmp_path, capsys):
    from llmsparse.kernels import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--shapes", "32x64", "--m", "1,80", "--sparsities", "0.7", "--quiet",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["m"] for r in report["rows"]] == [1, 80]
    for row in report["rows"]:
        assert list(row["columns"]) == ["dense", "ours 2:4 (kernel)", "SparseLinear 2:4", "bitmap 70%"]
        for entry in row["columns"].values():
            assert entry["rel_err"] < 1e-2 and entry["wall"]["ms"] > 0
        assert row["columns"]["dense"]["wall"]["speedup"] == 1.0
        assert row["columns"]["bitmap 70%"]["weight_bytes"] < row["columns"]["dense"]["weight_bytes"] * 0.5
    text = capsys.readouterr().out
    assert "| M | dense | ours 2:4 (kernel) | SparseLinear 2:4 | bitmap 70% |" in text
    assert "Triton interpreter" in text


def test_bench_refuses_real_shapes_without_a_gpu():
    from llmsparse.kernels import bench

    with pytest.raises(LlmsparseError, match="--tiny"):
        bench.main(["--device", "cpu"])
    with pytest.raises(LlmsparseError, match="NxK"):
        bench.main(["--tiny", "--shapes", "4096by4096"])


@pytest.mark.slow
def test_e2e_bench_decodes_the_same_tokens_both_ways(tmp_path, monkeypatch, capsys):
    from llmsparse.kernels import bench_e2e

    monkeypatch.setattr(bench_e2e, "TINY", dict(bench_e2e.TINY, num_hidden_layers=1, hidden_size=64,
                                                intermediate_size=128))
    out = tmp_path / "e2e.json"
    assert bench_e2e.main(["--tiny", "--tokens", "2", "--prompt", "3", "--patterns", "2:4,0.7", "--quiet",
                           "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["dense", "2:4", "70% bitmap"]
    for name, r in results.items():
        assert r["generate"]["tokens_per_s"] > 0 and r["graph"]["tokens_per_s"] > 0
        assert r["greedy_tokens_agree"] == 1.0, name
    assert results["2:4"]["linear_weight_bytes"] * 16 == results["dense"]["linear_weight_bytes"] * 9
    assert results["70% bitmap"]["sparsify"]["swapped_bytes"] <= 1.05 * results["70% bitmap"]["sparsify"][
        "swapped_ideal_bytes"]
    assert "| model | decoder Linear weights |" in capsys.readouterr().out


def test_e2e_bench_refuses_bad_arguments():
    from llmsparse.kernels import bench_e2e

    with pytest.raises(LlmsparseError, match="--tiny"):
        bench_e2e.main(["--device", "cpu"])
    with pytest.raises(LlmsparseError, match="--patterns"):
        bench_e2e.main(["--tiny", "--patterns", "4:8"])


def test_kernel_bench_reports_a_failing_column_and_exits_non_zero(monkeypatch, capsys):
    from llmsparse.kernels import bench

    real = bench.build_columns

    def with_broken(*args, **kwargs):
        def broken():
            raise RuntimeError("no kernel image for this device")

        return real(*args, **kwargs)[:1] + [dict(name="broken", bytes=1, ref=None, make=broken)]

    monkeypatch.setattr(bench, "build_columns", with_broken)
    assert bench.main(["--tiny", "--shapes", "32x64", "--m", "1", "--sparsities", "0.7", "--quiet"]) == 1
    out = capsys.readouterr()
    assert "RuntimeError: no kernel image for this device" in out.out and "FAILED COLUMNS" in out.err
