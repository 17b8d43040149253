"""The report: its table and deltas from a known run record, and `llmsparse eval` end to end on stories260K."""

from __future__ import annotations

import json

import pytest
from conftest import ASSETS, STORIES, load_pair, need, random_tokens

from llmsparse.evaluation.report import fmt_metric, render_markdown, task_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run():
    """A run record as evaluate_run makes it: a dense baseline and a pruned model, two tasks, perplexity."""
    def model(label, sparsity, arc, arc_se, arc_norm, wino, ppl, settings=None):
        return {
            "label": label, "source": f"/models/{label}", "sparsity": sparsity, "layer_sparsity": [sparsity] * 3,
            "manifest": {"settings": settings} if settings else None,
            "lm_eval": {"results": {
                "llmsparse_arc_easy": {"alias": "x", "acc,none": arc, "acc_stderr,none": arc_se,
                                       "acc_norm,none": arc_norm, "acc_norm_stderr,none": 0.01},
                "llmsparse_winogrande": {"acc,none": wino, "acc_stderr,none": 0.02},
            }},
            "perplexity": {"ppl": ppl, "windows": 80, "seqlen": 512, "tokens": 40880, "text": "/t/wiki.txt"},
        }

    settings = {"method": "wanda", "sparsity": None, "pattern": {"type": "n:m", "n": 2, "m": 4, "sparsity": 0.5},
                "calib": "/data/c4.jsonl", "nsamples": 32, "seqlen": 512, "seed": 0, "ignore": [], "refine": "dsnot"}
    return {
        "llmsparse_version": "0.1.0", "lm_eval_version": "0.4.13", "torch_version": "2.x",
        "settings": {"tasks": ["arc_easy", "winogrande"], "limit": 200, "num_fewshot": None, "batch_size": 8,
                     "seed": 0},
        "tasks": {"requested": ["arc_easy", "winogrande"],
                  "run_as": {"arc_easy": "llmsparse_arc_easy", "winogrande": "llmsparse_winogrande"},
                  "offline_reason": "HF_HUB_OFFLINE is set", "data_dir": "/bench",
                  "local": ["llmsparse_arc_easy", "llmsparse_winogrande"]},
        "models": [model("dense", 0.0003, 0.6, 0.0346, 0.55, 0.52, 30.2),
                   model("wanda", 0.5, 0.535, 0.0353, 0.5, 0.525, 67.86, settings)],
    }


def test_task_metrics_pairs_values_with_stderr():
    metrics = task_metrics({"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1, "perplexity,none": 9.0,
                            "perplexity_stderr,none": "N/A", "sample_len": 10})
    assert metrics == {"acc": (0.5, 0.1), "perplexity": (9.0, None)}


def test_format_percent_stderr_and_signed_delta():
    assert fmt_metric("acc", 0.535, 0.0353, 0.6) == "53.5 ± 3.5 (−6.5)"
    assert fmt_metric("acc", 0.525, None, 0.52) == "52.5 (+0.5)"
    assert fmt_metric("ppl", 67.86, None, 30.2) == "67.86 (+37.66)"
    assert fmt_metric("acc", None) == "—"


def test_markdown_table_rows_and_models():
    text = render_markdown(_run())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model | sparsity"))
    assert header == "| model | sparsity | arc_easy acc | winogrande acc | WikiText-2 ppl |"
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| dense |") or line.startswith("| wanda |")}
    assert "| dense | 0.000 | 60.0 ± 3.5 | 52.0 ± 2.0 | 30.20 |" in lines
    assert "| wanda | 0.500 | 53.5 ± 3.5 (−6.5) | 52.5 ± 2.0 (+0.5) | 67.86 (+37.66) |" in lines
    assert "| wanda | 50.0 ± 1.0 (−5.0) |" in lines  # acc_norm, in the other-metrics table
    models = [line for line in lines if line.startswith("| wanda | `/models/wanda`")]
    assert models == ["| wanda | `/models/wanda` | wanda | 2:4 | c4.jsonl, 32 × 512 tokens | 0 | refine=dsnot | 0.5000 |"]
    assert "first 200 rows" in text and "HF_HUB_OFFLINE is set" in text and len(rows) == 2
    for png in ("accuracy_vs_sparsity.png", "perplexity_vs_sparsity.png", "layer_sparsity.png"):
        assert f"({png})" in text


@pytest.fixture
def pruned_stories(tmp_path):
    """stories260K pruned by magnitude to 50% and saved with its llmsparse.json."""
    from llmsparse import prune
    from llmsparse.checkpoint.save import save

    model, tokenizer = load_pair(str(need(STORIES)))
    report = prune(model, tokenizer, method="magnitude", sparsity=0.5, calibration=random_tokens(2, 16, vocab=512),
                   device="cpu", progress=False)
    folder = tmp_path / "stories-magnitude-50"
    save(model, folder, tokenizer, manifest={"model": str(STORIES), **report.to_json()})
    return folder


def test_cli_eval_writes_a_report_that_parses(tmp_path, pruned_stories, monkeypatch, capsys):
    from matplotlib.image import imread

    from llmsparse.cli import main

    need(ASSETS / "bench")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "report"
    text = ASSETS / "text" / "tinystories_sample.txt"
    code = main(["eval", str(STORIES), str(pruned_stories), "--tasks", "arc_easy", "--limit", "10",
                 "--ppl-text", str(need(text)), "--ppl-seqlen", "128", "--ppl-windows", "2", "--batch-size", "8",
                 "--labels", "dense,magnitude", "--out", str(out), "--quiet"])
    assert code == 0
    assert "arc_easy → llmsparse_arc_easy" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    dense, pruned = results["models"]
    assert (dense["label"], pruned["label"]) == ("dense", "magnitude")
    assert dense["sparsity"] < 0.01 and pruned["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert len(pruned["layer_sparsity"]) == 5 and all(s == pytest.approx(0.5, abs=1e-3) for s in pruned["layer_sparsity"])
    assert pruned["manifest"]["settings"]["method"] == "magnitude"
    for model in (dense, pruned):
        arc = model["lm_eval"]["results"]["llmsparse_arc_easy"]
        assert model["lm_eval"]["n-samples"]["llmsparse_arc_easy"]["effective"] == 10
        assert 0 <= arc["acc,none"] <= 1 and (arc["acc,none"] * 10) == pytest.approx(round(arc["acc,none"] * 10))
        assert model["perplexity"]["windows"] == 2 and model["perplexity"]["seqlen"] == 128
    assert results["results"]["magnitude"]["llmsparse_arc_easy"] == pruned["lm_eval"]["results"]["llmsparse_arc_easy"]
    # the table shows what results.json holds
    report = (out / "report.md").read_text()
    d, p = (m["lm_eval"]["results"]["llmsparse_arc_easy"] for m in (dense, pruned))
    delta = 100 * (p["acc,none"] - d["acc,none"])
    expected = f"{100 * p['acc,none']:.1f} ± {100 * p['acc_stderr,none']:.1f} ({'+' if delta >= 0 else '−'}{abs(delta):.1f})"
    row = next(line for line in report.splitlines() if line.startswith("| magnitude | 0.500 |"))
    assert row.split(" | ")[2] == expected
    assert "| magnitude | `" in report and "0.5 unstructured" in report
    for png in ("accuracy_vs_sparsity.png", "perplexity_vs_sparsity.png", "layer_sparsity.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert imread(out / png).ndim == 3


def test_cli_eval_refuses_bad_input_without_output(tmp_path, capsys):
    from llmsparse.cli import main

    need(ASSETS / "bench")  # the tasks are planned from local data before any model is opened
    out = tmp_path / "report"
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "arc_easy", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(need(STORIES)), "--tasks", "arc_easy", "--limit", "0", "--out", str(out)]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err
    assert not out.exists()
