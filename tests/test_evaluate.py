"""lm-eval really runs on stories260K with the offline tasks, and agrees with a direct log-likelihood computation."""

from __future__ import annotations

import bz2
import json

import pytest
import torch
from conftest import ASSETS, STORIES, need

from llmsparse.evaluation.harness import run_lm_eval
from llmsparse.evaluation.settings import EvalSettings
from llmsparse.evaluation.tasks import plan_tasks
from llmsparse.models.sparsity import weight_sparsity

BENCH = ASSETS / "bench"
LIMIT = 5


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reference_rows(task: str, n: int) -> list[dict]:
    """The first ``n`` rows as lm-eval's standard task would pose them, built straight from the local files:
    contexts, continuations (with the target delimiter), the choice texts acc_norm divides by, and the gold."""
    foundry = BENCH / "llmfoundry"
    if task in ("arc_easy", "arc_challenge"):
        return [{"contexts": [r["query"] + "\nAnswer:"] * len(r["choices"]),
                 "continuations": [" " + c for c in r["choices"]], "choices": r["choices"], "gold": r["gold"]}
                for r in _jsonl(foundry / f"{task}.jsonl")[:n]]
    if task == "boolq":
        return [{"contexts": [r["query"].removeprefix("Passage: ") + "\nAnswer:"] * 2,
                 "continuations": [" no", " yes"], "choices": ["no", "yes"], "gold": r["gold"]}
                for r in _jsonl(foundry / "boolq.jsonl")[:n]]
    if task == "piqa":
        rows = _jsonl(BENCH / "piqa_original" / "valid.jsonl")[:n]
        labels = (BENCH / "piqa_original" / "valid-labels.lst").read_text().split()
        return [{"contexts": [f"Question: {r['goal']}\nAnswer:"] * 2, "continuations": [" " + r["sol1"], " " + r["sol2"]],
                 "choices": [r["sol1"], r["sol2"]], "gold": int(label)} for r, label in zip(rows, labels)]
    if task == "winogrande":
        return [{"contexts": r["context_options"], "continuations": [" " + r["continuation"]] * 2,
                 "choices": r["context_options"], "gold": r["gold"]} for r in _jsonl(foundry / "winogrande.jsonl")[:n]]
    if task == "lambada_openai":
        return [{"contexts": [r["context"]], "continuations": [" " + r["continuation"]]}
                for r in _jsonl(foundry / "lambada_openai.jsonl")[:n]]
    if task == "hellaswag":
        from test_localtasks import _preprocess

        lines = bz2.decompress((BENCH / "hellaswag_val_full.txt.bz2").read_bytes()).decode().split("\n")
        rows = []
        for k in range(n):
            ctx, label, *endings = lines[6 * k:6 * k + 6]
            rows.append({"contexts": [_preprocess().recapitalise(ctx)] * 4, "continuations": [" " + e for e in endings],
                         "choices": endings, "gold": int(label)})
        return rows
    raise ValueError(task)


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """Sum of the continuation's token log-probabilities and whether greedy decoding yields it.

    Tokenised as lm-eval's HFLM does: trailing spaces move from the context to the continuation, the whole string
    is encoded, the continuation's tokens are those after the context's own encoding, and the input is cut from
    the left to the model's context length.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    target = whole[n_context:]
    tokens = whole[-(max_length + 1):]
    logits = model(torch.tensor([tokens[:-1]])).logits[0, -len(target):].float()
    logp = torch.log_softmax(logits, dim=-1)
    target_t = torch.tensor(target)
    return logp.gather(1, target_t[:, None]).sum().item(), bool((logp.argmax(-1) == target_t).all())


# The CI runs lm-eval once over four tasks of different shapes (one context and several continuations, yes/no,
# PIQA's original files, WinoGrande's partial evaluation); the other three run with -m slow.
FAST = ("arc_easy", "boolq", "piqa", "winogrande")
SLOW = ("arc_challenge", "lambada_openai", "hellaswag")
_RUNS: dict = {}


@pytest.fixture(scope="module")
def stories():
    from conftest import load_pair

    need(STORIES), need(BENCH)
    return load_pair(str(STORIES))


def lm_eval_run(stories, tasks: tuple) -> tuple[dict, dict]:
    """lm-eval over ``tasks`` (first LIMIT rows) with per-sample outputs, once per group; and the name mapping."""
    if tasks not in _RUNS:
        model, tokenizer = stories
        plan = plan_tasks(list(tasks), offline="test")
        try:
            out = run_lm_eval(model, tokenizer, plan, EvalSettings(tasks=list(tasks), limit=LIMIT, batch_size=4),
                              log_samples=True, verbose=False)
        finally:
            plan.close()
        _RUNS[tasks] = out, dict(zip(tasks, plan.names))
    return _RUNS[tasks]


@pytest.mark.parametrize("task", list(FAST) + [pytest.param(t, marks=pytest.mark.slow) for t in SLOW])
def test_local_task_equals_direct_loglikelihoods(stories, task):
    model, tokenizer = stories
    out, names = lm_eval_run(stories, FAST if task in FAST else SLOW)
    name = names[task]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    rows = reference_rows(task, LIMIT)
    assert [s["doc_id"] for s in samples] == list(range(LIMIT)) and out["n-samples"][name]["effective"] == LIMIT
    accs, norms = [], []
    for sample, row in zip(samples, rows):
        assert [tuple(a) for a in sample["arguments"]] == list(zip(row["contexts"], row["continuations"]))
        ref = [loglikelihood(model, tokenizer, c, k, model.config.max_position_embeddings)
               for c, k in zip(row["contexts"], row["continuations"])]
        got = [resp[0] for resp in sample["resps"]]
        assert [g[0] for g in got] == pytest.approx([r[0] for r in ref], abs=2e-3)
        if task == "lambada_openai":
            accs.append(float(ref[0][1]))
            continue
        lls = torch.tensor([r[0] for r in ref])
        accs.append(float(int(lls.argmax()) == row["gold"]))
        lengths = torch.tensor([float(len(c)) for c in row["choices"]])
        norms.append(float(int((lls / lengths).argmax()) == row["gold"]))
    result = out["results"][name]
    assert result["acc,none"] == pytest.approx(sum(accs) / LIMIT, abs=1e-12)
    if "acc_norm,none" in result:
        assert result["acc_norm,none"] == pytest.approx(sum(norms) / LIMIT, abs=1e-12)


def test_weight_sparsity_counts_zeros_per_layer():
    from conftest import tiny_model

    from llmsparse.models.structure import find_decoder_layers, find_targets

    model = tiny_model("llama")
    prefix, layers = find_decoder_layers(model)
    modules = find_targets(layers[1], f"{prefix}.1").modules
    with torch.no_grad():
        for module in modules.values():
            module.weight[:, ::2] = 0  # half of every weight (even column count)
    overall, per_layer = weight_sparsity(model)
    assert per_layer == [0.0, 0.5]
    layer_params = [sum(m.weight.numel() for m in find_targets(layer, "x").modules.values()) for layer in layers]
    assert overall == pytest.approx(0.5 * layer_params[1] / sum(layer_params))


def test_few_shot_examples_never_include_the_row_itself(stories, tmp_path):
    """A user's own 3-row copy (--data-path): with 2 shots, each row's examples must be the other two rows."""
    model, tokenizer = stories
    rows = _jsonl(BENCH / "llmfoundry" / "arc_easy.jsonl")[:3]
    (tmp_path / "llmfoundry").mkdir()
    (tmp_path / "llmfoundry" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_tasks(["arc_easy"], data_path=tmp_path, offline="test")
    try:
        out = run_lm_eval(model, tokenizer, plan, EvalSettings(tasks=["arc_easy"], num_fewshot=2, batch_size=4),
                          log_samples=True, verbose=False)
    finally:
        plan.close()
    assert out["n-shot"]["llmsparse_arc_easy"] == 2
    for sample in out["samples"]["llmsparse_arc_easy"]:
        context = sample["arguments"][0][0]
        own = rows[sample["doc_id"]]["query"]
        assert context.count(own) == 1 and context.endswith(own + "\nAnswer:")
        assert all(r["query"] in context for r in rows)
