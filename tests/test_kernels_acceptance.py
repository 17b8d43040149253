"""The GPU acceptance script, run end to end at tiny sizes on CPU (kernels in the Triton interpreter)."""

import json

import pytest
import torch
from llmsparse.kernels import _triton

from llmsparse.core.errors import LlmsparseError

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not _triton.can_run(torch.device("cpu")),
                                reason="CPU check of the script (needs TRITON_INTERPRET=1, set by conftest)")


def test_tiny_acceptance_checks_every_column_and_leaves_speeds_unmeasured(tmp_path, capsys):
    from llmsparse.kernels import acceptance

    out = tmp_path / "acceptance.json"
    assert acceptance.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    verdicts = {v["check"]: v["verdict"] for v in report["verdicts"]}
    correct = [c for c in verdicts if c.startswith("correct ")]
    assert len(correct) == 14 and all(verdicts[c] == "PASS" for c in correct)  # 5 columns x 2 decode M + 4 at 80
    assert "correct balanced 70% tiny M=1" in verdicts and "correct balanced 70% tiny M=80" not in verdicts
    speed = [c for c in verdicts if " >= " in c]
    assert len(speed) == 13 and all(verdicts[c] == "UNMEASURED" for c in speed)
    assert verdicts["end-to-end 70% bitmap decodes through the kernels"] == "PASS"
    text = capsys.readouterr().out
    assert "Speeds are UNMEASURED here" in text and "acceptance: 16 PASS, 0 FAIL, 13 UNMEASURED" in text


def test_a_wrong_column_fails_acceptance(monkeypatch, capsys):
    from llmsparse.kernels import acceptance

    real = acceptance.kernel_columns

    def with_wrong(*args, **kwargs):
        cols = real(*args, **kwargs)
        dense = cols[0]
        return cols + [dict(dense, name="wrong", make=lambda: (lambda x: -dense["make"]()(x)))]

    monkeypatch.setattr(acceptance, "kernel_columns", with_wrong)
    assert acceptance.main(["--tiny", "--quiet", "--no-e2e"]) == 1
    assert "| correct wrong tiny M=1 | rel err 2.0e+00 | FAIL |" in capsys.readouterr().out


def test_speed_goals_are_judged_only_with_a_timer():
    from llmsparse.kernels import acceptance

    rows = [{"label": "s", "m": 1, "columns": {"dense": {"rel_err": 0.0, "cudagraph": {"ms": 1.0, "speedup": 1.0}},
                                               "bitmap 70%": {"rel_err": 1e-3,
                                                              "cudagraph": {"ms": 0.5, "speedup": 2.0}}}}]
    lines = {x["check"]: x for x in acceptance.judge(rows, None, "cudagraph", measured=True)}
    assert lines["decode bitmap 70% s M=1 >= 2.3x"]["verdict"] == "FAIL"
    assert lines["decode SparseLinear 2:4 s M=1 >= 1.6x"]["verdict"] == "FAIL"  # a missing column is no pass
    rows[0]["columns"]["bitmap 70%"]["cudagraph"]["speedup"] = 2.4
    lines = {x["check"]: x for x in acceptance.judge(rows, None, "cudagraph", measured=True)}
    assert lines["decode bitmap 70% s M=1 >= 2.3x"] == {"check": "decode bitmap 70% s M=1 >= 2.3x",
                                                       "value": "2.40x", "verdict": "PASS"}


def test_acceptance_refuses_real_shapes_without_a_gpu():
    from llmsparse.kernels import acceptance

    with pytest.raises(LlmsparseError, match="--tiny"):
        acceptance.main(["--device", "cpu"])
