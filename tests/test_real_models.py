"""Real pretrained models from ../shared/assets: accuracy ordering on stories260K and the GGUF round trip."""

import pytest
import torch
from conftest import SMOLLM_DIR, SMOLLM_GGUF, STORIES, TEXT, load_pair, need

import llmsparse
from llmsparse.checkpoint.save import save
from llmsparse.data.calibration import calibration_windows
from llmsparse.data.text import tokenize_text
from llmsparse.evaluation.perplexity import perplexity


def split_text():
    """Calibrate on the first 60% of the TinyStories sample and evaluate on the rest (disjoint stories)."""
    text = need(TEXT / "tinystories_sample.txt").read_text()
    cut = text.index("\n", int(len(text) * 0.6))
    return text[:cut], text[cut:]


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_stories_perplexity_orders_as_expected(target):
    """dense < SparseGPT ≤ Wanda < magnitude on held-out text."""
    calib_text, eval_text = split_text()
    ppl = {}
    for method in ("dense", "magnitude", "wanda", "sparsegpt"):
        model, tok = load_pair(str(need(STORIES)))
        if method != "dense":
            windows = calibration_windows(tok, [calib_text], 32, 128, seed=0)
            llmsparse.prune(model, tok, calibration=windows, method=method, progress=False, device="cpu", **target)
        ppl[method] = perplexity(model, tokenize_text(tok, eval_text), seqlen=128).ppl
    assert ppl["dense"] < ppl["sparsegpt"] <= ppl["wanda"] < ppl["magnitude"], ppl


def test_gguf_model_prunes_saves_and_reloads_in_plain_transformers(tmp_path):
    """transformers refuses save_pretrained on a GGUF-loaded model; ours saves exact plain tensors."""
    from transformers import AutoModelForCausalLM

    gguf = need(SMOLLM_DIR / SMOLLM_GGUF)
    model, tok = load_pair(str(gguf))
    assert next(model.parameters()).dtype == torch.float32
    windows = calibration_windows(tok, [need(TEXT / "tinystories_sample.txt").read_text()], 2, 16, seed=0)
    report = llmsparse.prune(model, tok, calibration=windows, method="magnitude", sparsity=0.5, progress=False,
                             device="cpu")
    out = save(model, tmp_path / "smol", tok, manifest=report.to_json())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    q = reloaded.model.layers[3].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()


@pytest.mark.slow
def test_export_reads_a_gguf_file_like_every_other_source(tmp_path, capsys):
    """`llmsparse export model.gguf` (refused before the workflows were unified) writes a folder that loads back
    with the GGUF model's logits, tokenizer included."""
    from llmsparse.cli import main

    gguf = need(SMOLLM_DIR / SMOLLM_GGUF)
    model, tok = load_pair(str(gguf))
    assert main(["export", str(gguf), "--format", "dense", "--out", str(tmp_path / "smol"), "--quiet"]) == 0
    again, tok2 = load_pair(str(tmp_path / "smol"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(tok2("The capital of France is", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
