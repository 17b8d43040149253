"""Offline task plumbing: name mapping, data folder resolution, prepared files, and the local rows' conversion."""

from __future__ import annotations

import bz2
import json
import sys

import pytest
import yaml
from conftest import ASSETS, need

from llmsparse.core.errors import LlmsparseError
from llmsparse.evaluation.tasks import (
    LOCAL,
    find_data_dir,
    hub_offline,
    plan_tasks,
    prepare_hellaswag,
    prepare_piqa,
    read_task_config,
    task_dir,
)

BENCH = ASSETS / "bench"


def _preprocess():
    sys.path.insert(0, str(task_dir()))
    try:
        import preprocess
    finally:
        sys.path.pop(0)
    return preprocess


def test_every_standard_task_has_a_config_with_its_metrics():
    for standard, local in LOCAL.items():
        config = read_task_config(local)
        assert config["task"] == local
        assert config["metadata"]["standard_task"] == standard
        assert config["dataset_kwargs"]["data_files"]
    # the metric lists are those of lm-eval's own configs
    assert [m["metric"] for m in read_task_config("llmsparse_hellaswag")["metric_list"]] == ["acc", "acc_norm"]
    assert [m["metric"] for m in read_task_config("llmsparse_winogrande")["metric_list"]] == ["acc"]
    assert [m["metric"] for m in read_task_config("llmsparse_lambada_openai")["metric_list"]] == ["perplexity", "acc"]


def test_offline_maps_standard_names_and_says_so(assets):
    plan = plan_tasks(["arc_easy", "llmsparse_piqa", "hellaswag"], offline="HF_HUB_OFFLINE is set")
    try:
        assert plan.names == ["llmsparse_arc_easy", "llmsparse_piqa", "llmsparse_hellaswag"]
        assert plan.mapped == {"arc_easy": "llmsparse_arc_easy", "hellaswag": "llmsparse_hellaswag"}
        assert "HF_HUB_OFFLINE" in plan.message() and "arc_easy → llmsparse_arc_easy" in plan.message()
        wrappers = sorted(p.name for p in plan.include_path.iterdir())
        assert wrappers == ["llmsparse_arc_easy.yaml", "llmsparse_hellaswag.yaml", "llmsparse_piqa.yaml"]
        arc = yaml.safe_load((plan.include_path / "llmsparse_arc_easy.yaml").read_text())
        assert arc["include"] == str(task_dir() / "llmsparse_arc_easy.yaml")
        assert arc["dataset_kwargs"]["data_files"]["test"] == str(BENCH / "llmfoundry" / "arc_easy.jsonl")
    finally:
        plan.close()
    assert not plan.include_path.exists()


def test_online_keeps_standard_names():
    plan = plan_tasks(["arc_easy", "mmlu"], offline=False)
    assert plan.names == ["arc_easy", "mmlu"] and plan.mapped == {} and plan.include_path is None
    assert plan.message() is None


def test_offline_refuses_a_task_without_local_copy():
    with pytest.raises(LlmsparseError, match="'mmlu' needs the hub.*offline tasks are"):
        plan_tasks(["arc_easy", "mmlu"], offline="no network")
    with pytest.raises(LlmsparseError, match="unknown local task 'llmsparse_mmlu'"):
        plan_tasks(["llmsparse_mmlu"], offline=False)


def test_hub_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline() == "HF_HUB_OFFLINE is set"


def test_data_dir_resolution(tmp_path, monkeypatch):
    with pytest.raises(LlmsparseError, match="--data-path"):
        find_data_dir(tmp_path / "missing")
    monkeypatch.setenv("LLMSPARSE_BENCH_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path
    assert find_data_dir(need(BENCH)) == BENCH


def test_missing_data_file_is_named(tmp_path):
    (tmp_path / "llmfoundry").mkdir()
    with pytest.raises(LlmsparseError, match="arc_easy.jsonl not found"):
        plan_tasks(["llmsparse_arc_easy"], data_path=tmp_path, offline=False)


def test_prepared_files_go_to_the_cache_and_match_the_sources(tmp_path, monkeypatch):
    need(BENCH)
    monkeypatch.setenv("LLMSPARSE_CACHE", str(tmp_path / "cache"))
    text = prepare_hellaswag(BENCH)
    assert text.is_relative_to(tmp_path / "cache")
    assert text.read_bytes() == bz2.decompress((BENCH / "hellaswag_val_full.txt.bz2").read_bytes())
    assert prepare_hellaswag(BENCH) == text  # reused, not rebuilt
    piqa = [json.loads(line) for line in prepare_piqa(BENCH).read_text().splitlines()]
    originals = [json.loads(line) for line in (BENCH / "piqa_original" / "valid.jsonl").read_text().splitlines()]
    labels = (BENCH / "piqa_original" / "valid-labels.lst").read_text().split()
    assert len(piqa) == len(originals) == len(labels) == 1838
    assert all(p["sol1"] == o["sol1"] and p["label"] == int(lab) for p, o, lab in zip(piqa, originals, labels))


def test_hellaswag_recapitalisation_matches_the_standard_prompts():
    pre = _preprocess()
    # The dataset's ActivityNet rows (ctx_a, ctx_b) and lm-eval's resulting queries:
    assert pre.recapitalise("Roof shingle removal: A man is sitting on a roof. he") == \
        "Roof shingle removal: A man is sitting on a roof. He"
    assert pre.recapitalise("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady") \
        == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    # str.capitalize also lowers the rest of ctx_b, as lm-eval does
    assert pre.recapitalise("Sumo: Two men stand. the man in the USA") == "Sumo: Two men stand. The man in the usa"
    # WikiHow rows (ctx_b empty) end with a whole sentence and stay as they are
    wikihow = "Health: How to get rid of a cold. Drink plenty of fluids. keep resting in bed."
    assert pre.recapitalise(wikihow) == wikihow
    assert pre.recapitalise("Health: Call a doctor. They are open monday to friday 7 a.m.-10 p.m.") == \
        "Health: Call a doctor. They are open monday to friday 7 a.m.-10 p.m."


def test_boolq_and_arc_rows_convert_back_exactly():
    import datasets

    pre = _preprocess()
    boolq = pre.boolq(datasets.Dataset.from_list([
        {"query": "Passage: Line one.\nQuestion: a trick?\nQuestion: is it true?", "choices": ["no", "yes"], "gold": 1}]))
    assert boolq[0] == {"passage": "Line one.\nQuestion: a trick?", "question": "is it true", "label": 1}
    arc = pre.arc(datasets.Dataset.from_list([{"query": "Question: Why?", "choices": ["a", "b", "c"], "gold": 2}]))
    assert arc[0] == {"question": "Why?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
                      "answerKey": "C"}
    with pytest.raises(ValueError, match="does not start with"):
        pre.arc(datasets.Dataset.from_list([{"query": "Q: Why?", "choices": ["a"], "gold": 0}]))

