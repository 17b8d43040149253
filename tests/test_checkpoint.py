"""Compact checkpoints: exact round trips (sparse and densified), sharding, sizes against the ideal, offload, the
transformers route, dense export for plain transformers, ``inspect`` and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, REPO, STORIES, TEXT, load_pair, need, tiny_model
from llmsparse.kernels import formats as fmts
from safetensors import safe_open
from safetensors.torch import save_file
from test_sparse import prune_model
from torch import nn

import llmsparse
from llmsparse.checkpoint.compact import choose_format
from llmsparse.checkpoint.save import save
from llmsparse.cli import main
from llmsparse.data.demo import DEMO_TEXT
from llmsparse.inference.sparse_linear import SparseLinear
from llmsparse.pruning.masks import nm_mask, topk_row_mask

ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def file_tensors(folder):
    """Every tensor name → (file, shape, dtype), read with safetensors itself (independent of llmsparse)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (path.name, tuple(sl.get_shape()), sl.get_dtype())
    return out


def sparse_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact_sparse_and_densified(family, tmp_path):
    model = tiny_model(family)
    prune_model(model, ["2:4", 0.7])
    ids = torch.randint(0, 128, (2, 9))
    ref, ref_tokens = logits(model, ids), greedy(model, ids[:1])
    out = save(model, tmp_path / "c", format="compact", manifest={"note": "test"}, max_shard_size="20KB")

    config = json.loads((out / "config.json").read_text())
    modules = config["quantization_config"]["sparsity_config"]["modules"]
    stored = {n for n, e in modules.items() if e["format"] != "dense"}
    assert {e["format"] for n, e in modules.items() if n in stored} == {"2:4", "bitmap"}
    assert json.loads((out / "llmsparse.json").read_text())["save_format"] == "compact"

    sparse = llmsparse.load(out)
    assert set(sparse_modules(sparse)) == stored
    assert (logits(sparse, ids) - ref).abs().max() <= ATOL
    assert torch.equal(greedy(sparse, ids[:1]), ref_tokens)

    dense = llmsparse.load(out, densify=True)
    assert not sparse_modules(dense) and getattr(dense.config, "quantization_config", None) is None
    for name in stored:  # the architecture's own module type comes back (Conv1D for GPT-2)
        assert type(dense.get_submodule(name)) is type(model.get_submodule(name))
    assert (logits(dense, ids) - ref).abs().max() <= ATOL
    assert torch.equal(greedy(dense, ids[:1]), ref_tokens)
    assert not sparse_modules(model), "saving must leave the in-memory model as it was"


def test_stories260k_round_trip_after_a_real_prune(tmp_path):
    model, tok = load_pair(str(need(STORIES)))
    llmsparse.prune(model, tok, method="wanda", pattern="2:4", calib=str(DEMO_TEXT), nsamples=4, seqlen=64,
                    progress=False, device="cpu")
    ids = tok("Once upon a time there was a little", return_tensors="pt").input_ids
    ref, ref_tokens = logits(model, ids), greedy(model, ids, 16)
    out = save(model, tmp_path / "s", tok, format="compact")
    for densify in (False, True):
        back = llmsparse.load(out, densify=densify)
        assert len(sparse_modules(back)) == (0 if densify else 35)  # 5 layers x 7 projections, all 2:4
        assert (logits(back, ids) - ref).abs().max() <= ATOL
        assert torch.equal(greedy(back, ids, 16), ref_tokens)


def test_sharding_follows_transformers_index_layout(tmp_path):
    model = tiny_model("llama")
    prune_model(model, ["2:4", 0.7])
    out = save(model, tmp_path / "c", format="compact", max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    found = file_tensors(out)
    assert {k: v[0] for k, v in found.items()} == index["weight_map"]
    assert shards == sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sum(
        fmts_bytes(shape, dtype) for _, shape, dtype in found.values())
    assert max((out / s).stat().st_size for s in shards) < 2 * 20_000  # one tensor may overflow a shard, not two
    # the same keys as the index transformers writes itself for the dense model at the same shard size
    own = json.loads((save(model, tmp_path / "d", max_shard_size="20KB")
                      / "model.safetensors.index.json").read_text())
    assert set(index) == set(own) and set(index["metadata"]) == set(own["metadata"])
    ids = torch.randint(0, 128, (1, 7))
    assert (logits(llmsparse.load(out), ids) - logits(model, ids)).abs().max() <= ATOL


def fmts_bytes(shape, dtype):
    size = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}[dtype]
    n = 1
    for d in shape:
        n *= d
    return n * size


def wide_llama(dtype):
    """A Llama whose projections are large next to the embeddings and headers, for size measurements."""
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                        num_hidden_layers=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pattern", ["2:4", 0.7])
def test_disk_size_is_within_5_percent_of_the_ideal(pattern, dtype, tmp_path):
    model = wide_llama(dtype)
    pruned = prune_model(model, [pattern])
    pruned_names = {n for n, m in model.named_modules() if any(m is p for p in pruned)}
    es = torch.empty((), dtype=dtype).element_size()
    ideal = 0
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in pruned_names and name.endswith(".weight"):
            kept = int((tensor != 0).sum())
            # 2:4: each kept value and its 2-bit position; unstructured: each kept value and 1 bit per weight
            ideal += kept * es + (kept * 2 + 7) // 8 if pattern == "2:4" else kept * es + (tensor.numel() + 7) // 8
        else:
            ideal += tensor.numel() * es
    out = save(model, tmp_path / "c", format="compact")
    disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert ideal <= disk <= 1.05 * ideal, (disk, ideal)


def test_choose_format_picks_the_smallest_that_fits():
    from llmsparse.pruning.masks import check_nm

    w = torch.randn(64, 128)
    half = nm_mask(w.abs(), 2, 4)
    quarter = half & (torch.rand(64, 128) < 0.5)  # still fits 2:4, but ~75% zeros: a bitmap is smaller
    light = topk_row_mask(w.abs(), 0.02)
    for keep, expected in [(half, "2:4"), (quarter, "bitmap"), (light, "dense"), (torch.ones_like(half), "dense")]:
        name, compressed, _ = choose_format(w * keep, keep)
        assert name == expected
        sizes = [w.numel() * 4, fmts.compress(w * keep, keep, "bitmap").nbytes]
        if check_nm(keep, 2, 4):
            sizes.append(fmts.compress(w * keep, keep, "2:4").nbytes)
        assert (compressed.nbytes if compressed is not None else w.numel() * 4) == min(sizes)


def test_tied_embeddings_stay_dense_and_are_stored_once(tmp_path):
    model = tiny_model("gpt2")  # lm_head tied to wte
    prune_model(model, ["2:4"])
    out = save(model, tmp_path / "c", format="compact")
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["modules"]
    assert modules["lm_head"]["format"] == "dense" and "tied" in modules["lm_head"]["reason"]
    assert "lm_head.weight" not in file_tensors(out)
    back = llmsparse.load(out)
    assert back.lm_head.weight is back.transformer.wte.weight


def test_loading_never_builds_a_dense_weight_and_holds_the_file_bytes(tmp_path, monkeypatch):
    model = tiny_model("llama")
    prune_model(model, ["2:4", 0.7])
    out = save(model, tmp_path / "c", format="compact")

    def refuse(self):
        raise AssertionError("a dense weight was built while loading")

    monkeypatch.setattr(fmts.NMWeight, "decompress", refuse)
    monkeypatch.setattr(fmts.BitmapWeight, "decompress", refuse)
    back = llmsparse.load(out)
    monkeypatch.undo()
    found = file_tensors(out)
    for name, module in sparse_modules(back).items():
        parts = [k for k in found if k.rsplit(".", 1)[0] == name and not k.endswith(".bias")]
        assert module.nbytes == sum(fmts_bytes(found[k][1], found[k][2]) for k in parts)


def test_device_map_offloads_sparse_layers_to_disk(tmp_path):
    model = tiny_model("llama")
    prune_model(model, ["2:4", 0.7])
    ids = torch.randint(0, 128, (1, 7))
    ref = logits(model, ids)
    out = save(model, tmp_path / "c", format="compact")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    back = llmsparse.load(out, device_map=device_map, offload_folder=tmp_path / "offload")
    on_disk = sparse_modules(back.model.layers[1])
    in_ram = sparse_modules(back.model.layers[0])
    assert on_disk and all(m.values.is_meta for m in on_disk.values())  # held by accelerate's disk offload
    assert in_ram and not any(m.values.is_meta for m in in_ram.values())
    assert (logits(back, ids) - ref).abs().max() <= ATOL
    auto = llmsparse.load(out, device_map="auto", max_memory={"cpu": "30KB"}, offload_folder=tmp_path / "o2")
    assert "disk" in set(auto.hf_device_map.values())
    assert (logits(auto, ids) - ref).abs().max() <= ATOL
    with pytest.raises(llmsparse.LlmsparseError, match="densify needs every sparse layer in memory"):
        llmsparse.load(out, device_map=device_map, offload_folder=tmp_path / "o3", densify=True)
    for fmt in ("compact", "dense"):  # offloaded layers are read back from accelerate's store to be saved
        again = save(back, tmp_path / f"again-{fmt}", format=fmt)
        assert (logits(llmsparse.load(again), ids) - ref).abs().max() <= ATOL
    assert all(m.values.is_meta for m in sparse_modules(back.model.layers[1]).values())


def test_a_model_pruned_with_disk_offload_saves_compact(tmp_path):
    """``prune --device-map`` keeps some layers on disk; the compact writer reads them from accelerate's store."""
    settings = dict(method="magnitude", pattern="2:4", calib=str(DEMO_TEXT), nsamples=2, seqlen=32, progress=False,
                    device="cpu")
    reference, tok = load_pair(str(need(STORIES)))
    llmsparse.prune(reference, tok, **settings)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
                  "model.layers.3": "disk", "model.layers.4": "cpu"}
    model, _ = load_pair(str(need(STORIES)), device_map=device_map, offload_folder=tmp_path / "offload")
    llmsparse.prune(model, tok, **settings)
    assert model.model.layers[2].self_attn.q_proj.weight.is_meta
    out = save(model, tmp_path / "c", tok, format="compact")
    back = llmsparse.load(out)
    assert len(sparse_modules(back)) == 35
    ids = torch.randint(0, 512, (1, 12))
    assert (logits(back, ids) - logits(reference, ids)).abs().max() <= ATOL


def test_from_pretrained_after_import_and_a_cast_on_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    prune_model(model, ["2:4", 0.7])
    out = save(model, tmp_path / "c", format="compact")
    back = AutoModelForCausalLM.from_pretrained(out)
    assert len(sparse_modules(back)) == 14
    half = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    for m in sparse_modules(half).values():
        assert m.values.dtype == torch.float16
        weight = m.weight_format
        if isinstance(weight, fmts.BitmapWeight):  # fp32 tiles padded to 4 values, re-packed to fp16's 8
            assert bool((weight.offsets % 8 == 0).all())
    expected = {n: mod.weight.to(torch.float16) for n, mod in model.named_modules() if n in sparse_modules(half)}
    for name, m in sparse_modules(half).items():
        assert torch.equal(m.dense_weight(), expected[name])
    half.dequantize()
    assert not sparse_modules(half) and getattr(half.config, "quantization_config", None) is None


def test_dense_export_loads_in_plain_transformers_without_llmsparse(tmp_path):
    """Both dense routes (saved from the pruned model, exported from a compact folder) in a Python that never
    imports llmsparse: same logits and the same greedy tokens as the pruned model."""
    model = tiny_model("gpt2")
    prune_model(model, ["2:4", 0.7])
    ids = torch.randint(0, 128, (1, 8))
    ref, ref_tokens = logits(model, ids), greedy(model, ids)
    direct = save(model, tmp_path / "direct", manifest={"note": "test"})
    compact = save(model, tmp_path / "c", format="compact")
    assert main(["export", str(compact), "--format", "dense", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    folders = [direct, tmp_path / "d"]
    for dense in folders:
        config = json.loads((dense / "config.json").read_text())
        assert "quantization_config" not in config and "sparsity" not in json.dumps(config)
        assert all(k.endswith((".weight", ".bias")) for k in file_tensors(dense))
    save_file({"ids": ids, "ref": ref, "tokens": ref_tokens}, tmp_path / "ref.safetensors")
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"d = load_file({str(tmp_path / 'ref.safetensors')!r})\n"
        f"for folder in {[str(f) for f in folders]!r}:\n"
        "    m = AutoModelForCausalLM.from_pretrained(folder)\n"
        "    assert getattr(m.config, 'quantization_config', None) is None\n"
        "    with torch.no_grad():\n"
        "        diff = (m(d['ids']).logits - d['ref']).abs().max().item()\n"
        "        out = m.generate(d['ids'], max_new_tokens=8, do_sample=False, pad_token_id=0)\n"
        "    print(diff, torch.equal(out, d['tokens']))\n"
        "print(sorted(k for k in sys.modules if k.startswith('llmsparse')))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    *rows, imported = run.stdout.strip().splitlines()[-3:]
    assert imported == "[]", "llmsparse was imported"
    for row in rows:
        diff, same = row.split()
        assert float(diff) <= ATOL and same == "True"


def test_load_takes_plain_dense_folders():
    model, _ = load_pair(str(need(STORIES)))
    back = llmsparse.load(need(STORIES))
    ids = torch.randint(0, 512, (1, 10))
    assert not sparse_modules(back)
    assert torch.equal(logits(back, ids), logits(model, ids))


def test_inspect_reports_formats_sparsity_and_bytes(tmp_path, capsys):
    model = wide_llama(torch.bfloat16)
    pruned = prune_model(model, ["2:4", 0.7])
    out = save(model, tmp_path / "c", format="compact")
    dense = save(model, tmp_path / "d")
    report = llmsparse.inspect_folder(out)
    rows = {m.name: m for m in report.modules}
    for name, module in model.named_modules():
        if any(module is p for p in pruned):
            w = module.weight
            row = rows[name]
            assert row.sparsity == pytest.approx(float((w == 0).float().mean()))
            assert row.dense_bytes == w.numel() * 2
            if row.format == "2:4":  # bf16 values for half the weights, 2 bits each
                assert row.bytes == row.ideal_bytes == w.numel() + w.numel() // 8
    t = report.totals()
    assert t["by_format"] == {"2:4": 7, "bitmap": 7, "dense": 1}
    assert t["tensor_bytes"] == sum(fmts_bytes(s, d) for _, s, d in file_tensors(out).values())
    assert t["dense_bytes"] == sum(fmts_bytes(s, d) for _, s, d in file_tensors(dense).values())
    assert t["file_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    from_dense = llmsparse.inspect_folder(dense).totals()
    assert from_dense["compact_bytes"] == t["tensor_bytes"] and from_dense["ideal_bytes"] == t["ideal_bytes"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    printed = {line.split()[0]: line.split() for line in text.splitlines()[1:] if line.split()[0] in rows}
    assert set(printed) == set(rows)
    for name, cells in printed.items():  # module, format, sparsity %, MiB stored, dense, ideal
        row = rows[name]
        assert cells[1] == row.format and float(cells[2].rstrip("%")) == pytest.approx(100 * row.sparsity, abs=6e-3)
        for cell, size in zip(cells[3:6], (row.bytes, row.dense_bytes, row.ideal_bytes)):
            assert float(cell) == pytest.approx(size / 2**20, abs=6e-4)
    totals = text.splitlines()[-1]
    assert totals.startswith("all tensors:")
    assert f"({t['tensor_bytes'] / t['dense_bytes']:.3f}x)" in totals
    assert f"({t['tensor_bytes'] / t['ideal_bytes']:.3f}x)" in totals
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"] == json.loads(json.dumps(t))


def test_cli_prune_compact_inspect_and_export_round_trip(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--pattern", "2:4", "--method", "magnitude", "--save-format", "compact",
                 "--max-shard-size", "200KB", "--out", str(out), "--nsamples", "2", "--seqlen", "16", "--quiet"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    sparse = llmsparse.load(out)
    assert len(sparse_modules(sparse)) == 35
    assert main(["export", str(out), "--format", "dense", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("model.", "lm_head"))]
    assert len(rows) == 36 and sum(r[1:3] == ["2:4", "50.00%"] for r in rows) == 35  # lm_head: tied, dense
    stored = sum(fmts_bytes(s, d) for _, s, d in file_tensors(out).values())
    dense = sum(fmts_bytes(s, d) for _, s, d in file_tensors(tmp_path / "d").values())
    assert lines[-1].startswith("all tensors:") and f"dense ({stored / dense:.3f}x)" in lines[-1]
    assert main(["export", str(tmp_path / "d"), "--format", "compact", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    again = llmsparse.load(tmp_path / "c")
    ids = torch.randint(0, 512, (1, 12))
    assert torch.equal(logits(again, ids), logits(sparse, ids))
    assert (tmp_path / "c" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "c" / "llmsparse.json").read_text())["save_format"] == "compact"
    assert main(["export", str(out), "--format", "compact", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model("llama")
    prune_model(model, ["2:4"])

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError):
        save(model, tmp_path / "c", format="compact")
    assert list(tmp_path.iterdir()) == []
    assert not sparse_modules(model) and getattr(model.config, "quantization_config", None) is None
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_checkpoint_benchmark_script_at_a_tiny_size(tmp_path, capsys):
    """evals/bench_checkpoint.py end to end on stories260K: sizes, load times and reloaded perplexities."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_checkpoint", REPO / "evals" / "bench_checkpoint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calib = need(TEXT / "c4_en_train00000_first1000.jsonl")
    eval_text = tmp_path / "wikitext2_start.txt"  # a slice, so that tokenising the whole test set takes no time
    eval_text.write_text(need(TEXT / "wikitext2_raw_test_joined.txt").read_text()[:20_000])
    assert bench.main(["--model", str(need(STORIES)), "--targets", "2:4,0.7", "--calib", str(calib),
                       "--nsamples", "2", "--seqlen", "32", "--seqlen-eval", "32", "--eval-windows", "2",
                       "--eval-text", str(eval_text), "--no-write"]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["target"] for r in results] == ["2:4", "0.7"]
    for r, fmt in zip(results, ("2:4", "bitmap")):
        assert r["inspect"]["by_format"][fmt] == 35
        assert r["compact_bytes"] < 0.7 * r["dense_bytes"] and r["bf16_compact_bytes"] < r["bf16_dense_bytes"]
        assert all(r[f"load_{name}_s"] > 0 for name in ("dense", "compact", "compact_noverify", "compact_densified"))
        assert len(set(r["ppl"].values())) == 1 and set(r["ppl"]) == {"pruned", "dense", "compact",
                                                                     "compact_densified"}
        assert max(r["max_abs_logit_diff"].values()) <= ATOL
    assert lines[-1] == "reloaded perplexities equal the pruned model's: True"
    assert sum(line.startswith(("| 2:4 |", "| 0.7 |")) for line in lines) == 2


def test_a_bad_shard_size_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """transformers would only reject it when writing, after a prune of possibly hours."""
    from llmsparse.checkpoint.save import shard_size

    assert shard_size("200000") == 200_000 and shard_size("2MiB") == 2 * 2**20 and shard_size("5GB") == 5 * 10**9

    def no_pruning(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("llmsparse.workflows.prune.open_model", no_pruning)
    for size in ("lots", "0KB", "-5MB"):
        assert main(["prune", "--pattern", "2:4", "--method", "magnitude", f"--max-shard-size={size}",
                     "--out", str(tmp_path / "p"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("llmsparse: error: --max-shard-size") and len(err.strip().splitlines()) == 1
    model = tiny_model("llama")
    with pytest.raises(llmsparse.LlmsparseError, match="not a size"):
        save(model, tmp_path / "c", format="compact", max_shard_size="5 gigabytes")
    assert list(tmp_path.iterdir()) == []
