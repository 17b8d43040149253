"""The checksum table (issue 19): every folder llmsparse writes records the size and hash of every file and tensor in
its llmsparse.json; ``llmsparse.load``, ``load_tokenizer``, ``export`` and ``inspect --verify`` check it before
anything else reads the folder, and refuse damage with one line naming the file and, in a shard, the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_pair

import llmsparse
from llmsparse.checkpoint.checksums import seal, verify_folder
from llmsparse.cli import main
from llmsparse.core.errors import LlmsparseError
from llmsparse.core.folders import read_manifest
from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT

IDS = torch.arange(1, 33)[None]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """stories260K pruned by magnitude to 50%, saved dense (sharded) and compact, with tokenizer and manifest."""
    model, tokenizer = load_pair(str(DEMO_MODEL))
    report = llmsparse.prune(model, tokenizer, method="magnitude", sparsity=0.5, calib=str(DEMO_TEXT), nsamples=2,
                             seqlen=32, device="cpu", progress=False)
    root = tmp_path_factory.mktemp("written")
    folders = {fmt: llmsparse.save(model, root / fmt, tokenizer, format=fmt, manifest=report.to_json(),
                                   max_shard_size="400KB" if fmt == "dense" else None)
               for fmt in ("dense", "compact")}
    with torch.no_grad():
        logits = model(IDS).logits
    return folders, logits


@pytest.fixture(params=["dense", "compact"])
def folder(request, written, tmp_path):
    return shutil.copytree(written[0][request.param], tmp_path / request.param)


def table(folder: Path) -> dict:
    return json.loads((folder / "llmsparse.json").read_text())["checksums"]


def shard_of(folder: Path, tensor: str) -> Path:
    index = folder / "model.safetensors.index.json"
    return folder / (json.loads(index.read_text())["weight_map"][tensor] if index.exists() else "model.safetensors")


def tensor_offset(path: Path, tensor: str) -> int:
    from llmsparse.models.files import read_header

    return read_header(path)[tensor].start


def flip(path: Path, at: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))


def refused(call, *fragments) -> str:
    with pytest.raises(LlmsparseError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_every_file_and_tensor_is_in_the_table(folder):
    files = table(folder)["files"]
    on_disk = {p.name for p in folder.iterdir()} - {"llmsparse.json"}
    assert set(files) == on_disk and {"config.json", "tokenizer.json", "generation_config.json"} <= on_disk
    shards = [n for n in files if n.endswith(".safetensors")]
    assert len(shards) == (3 if folder.name == "dense" else 1)
    for name in shards:
        record = files[name]
        assert record["bytes"] == (folder / name).stat().st_size and len(record["header_hash"]) == 16
        from llmsparse.models.files import read_header

        assert set(record["tensors"]) == set(read_header(folder / name))
    assert json.loads((folder / "config.json").read_text())["llmsparse_checksums"] == "llmsparse.json"
    assert read_manifest(folder)["save_format"] == folder.name  # the manifest is kept, the table checks itself
    check = verify_folder(folder)
    assert check.bytes == sum(r["bytes"] for r in files.values()) and check.tensors > 40


def test_the_intact_folder_loads_with_the_same_logits(folder, written):
    model = llmsparse.load(folder)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, written[1])
    assert not hasattr(model.config, "llmsparse_checksums")  # a re-save by transformers claims no checksums


def test_a_flipped_bit_in_the_embeddings_is_refused_naming_the_tensor(folder):
    """The issue's case: the CRC-32s of the compressed tensors alone let damage to a dense tensor load silently."""
    key = "model.embed_tokens.weight"
    path = shard_of(folder, key)
    flip(path, tensor_offset(path, key) + 1001, 3)
    refused(lambda: llmsparse.load(folder), path.name, f"tensor {key}", "checksum", "damaged")
    refused(lambda: llmsparse.export(folder, folder.parent / "out", format="dense"), path.name, key)
    assert not (folder.parent / "out").exists()
    llmsparse.load(folder, verify=False)  # the header-only checks cannot see it: verify=False trusts the bytes


def test_a_truncated_shard_names_the_tensors_cut(folder):
    path = shard_of(folder, "model.norm.weight")
    path.write_bytes(path.read_bytes()[:-100])
    refused(lambda: llmsparse.load(folder), path.name, "truncated", "cut short")


def test_damaged_config_json_is_refused_by_the_api_and_the_cli(folder, capsys):
    path = folder / "config.json"
    intact = path.read_bytes()
    for damaged in (intact[: len(intact) // 2], intact.replace(b'"hidden_size": 64', b'"hidden_size": 65'),
                    b"\xff" + intact[1:]):
        path.write_bytes(damaged)
        refused(lambda: llmsparse.load(folder), "config.json")
        refused(lambda: llmsparse.load_tokenizer(folder), "config.json")
        assert main(["inspect", str(folder), "--verify"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llmsparse: error: ") and "config.json" in err[0], err


def test_damaged_tokenizer_files_are_refused(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        intact = path.read_bytes()
        flip(path, len(intact) // 2, 1)
        refused(lambda: llmsparse.load_tokenizer(folder), name, "checksum")
        refused(lambda: llmsparse.load(folder), name)
        path.write_bytes(intact)
    llmsparse.load_tokenizer(folder)


def test_a_shard_swapped_with_another_folders_is_refused(written, tmp_path):
    """The same model saved again after one weight changed: same file names, sizes and header."""
    folders, _ = written
    model = llmsparse.load(folders["dense"])
    with torch.no_grad():
        model.model.norm.weight[0] += 1
    other = llmsparse.save(model, tmp_path / "other", format="dense", max_shard_size="400KB")
    mine = shutil.copytree(folders["dense"], tmp_path / "mine")
    shard = shard_of(mine, "model.norm.weight")
    shutil.copy(other / shard.name, shard)
    refused(lambda: llmsparse.load(mine), shard.name, "tensor model.norm.weight", "replaced")


def test_damaged_llmsparse_json_is_refused(folder):
    path = folder / "llmsparse.json"
    intact = path.read_text()
    cases = {
        "a value changed": intact.replace('"save_format": "', '"save_format": "x', 1),
        "a checksum changed": intact.replace('"hash": "', '"hash": "0', 1),
        "not JSON": intact[: len(intact) // 2],
        "whitespace changed": intact.replace("\n  ", "\n   ", 1),
        "the table's key damaged": intact.replace('"checksums"', '"checksumz"'),
        "the table removed": json.dumps({k: v for k, v in json.loads(intact).items() if k != "checksums"}),
    }
    for what, text in cases.items():
        path.write_text(text)
        message = refused(lambda: llmsparse.load(folder), "llmsparse.json")
        assert "damaged" in message or "not valid JSON" in message, (what, message)
        refused(lambda: llmsparse.load_tokenizer(folder), "llmsparse.json")
    path.write_text(intact)


def test_files_missing_or_added(folder):
    (folder / "README.md").write_text("notes\n")  # a file no loader reads may be added
    llmsparse.load(folder)
    (folder / "chat_template.jinja").write_text("{{ messages }}")  # the tokenizer would read it: refused
    refused(lambda: llmsparse.load_tokenizer(folder), "chat_template.jinja", "not in the checksum table")
    (folder / "chat_template.jinja").unlink()
    (folder / "generation_config.json").unlink()
    refused(lambda: llmsparse.load(folder), "generation_config.json", "missing")


def test_a_folder_without_a_table_loads_as_before(folder, tmp_path):
    """Another tool's folder (or an older llmsparse's): no table, config.json naming none; nothing is claimed."""
    (folder / "llmsparse.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["llmsparse_checksums"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    assert verify_folder(folder) is None
    llmsparse.load(folder)
    llmsparse.load_tokenizer(folder)
    report = llmsparse.inspect_folder(folder, verify=True)
    assert report.verified["table"] is False
    # an llmsparse.json without a table whose config.json does not name it (written before checksums) is read too
    (folder / "llmsparse.json").write_text(json.dumps({"model": "x"}))
    assert verify_folder(folder) is None and read_manifest(folder) == {"model": "x"}


def test_inspect_verify_says_what_it_checked(folder, capsys):
    assert main(["inspect", str(folder), "--verify"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"verified {len(table(folder)['files'])} files") and "llmsparse.json" in out[-1]
    assert main(["inspect", str(folder), "--verify", "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)["verified"]
    assert verified["table"] and set(verified["files"]) == set(table(folder)["files"])
    assert "verified" not in llmsparse.inspect_folder(folder).to_json()


def test_transformers_from_pretrained_checks_the_table_of_a_compact_folder(written, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(written[0]["compact"], tmp_path / "c")
    AutoModelForCausalLM.from_pretrained(folder)
    key = "model.embed_tokens.weight"
    path = shard_of(folder, key)
    flip(path, tensor_offset(path, key) + 7)
    refused(lambda: AutoModelForCausalLM.from_pretrained(folder), path.name, key)


def test_every_writer_seals_its_folder(written, tmp_path):
    """export (dense and compact; the files it copies are covered too), and a re-export of an export."""
    folders, logits = written
    source = shutil.copytree(folders["compact"], tmp_path / "src")
    (source / "README.md").write_text("model card\n")
    dense = llmsparse.export(source, tmp_path / "dense", format="dense")
    compact = llmsparse.export(dense, tmp_path / "compact", format="compact")
    for out in (dense, compact):
        files = table(out)["files"]
        assert "README.md" in files and "tokenizer.json" in files
        assert verify_folder(out).files == list(files)
        with torch.no_grad():
            assert torch.equal(llmsparse.load(out)(IDS).logits, logits)
    manifest = read_manifest(compact)
    assert manifest["save_format"] == "compact" and manifest["settings"]["method"] == "magnitude"  # carried over


def test_seal_after_an_edit_makes_a_consistent_folder(folder):
    """A deliberate edit is refused until the folder is sealed again (``seal``, what every writer ends with)."""
    path = folder / "generation_config.json"
    path.write_text(path.read_text().replace("}", ', "note": 1}'))
    refused(lambda: llmsparse.load(folder), "generation_config.json")
    seal(folder, read_manifest(folder, verify=False))
    llmsparse.load(folder)


def test_a_moefied_folders_modeling_code_is_covered(tmp_path):
    """transformers runs modeling_llmsparse_moe.py with trust_remote_code: an edited copy must not load."""
    from conftest import random_tokens, tiny_model

    model = tiny_model("llama")
    llmsparse.moefy(model, calibration=random_tokens(4, 32), experts=4, shared=1, top_k=2, device="cpu",
                    progress=False)
    for fmt in ("dense", "compact"):
        out = llmsparse.save(model, tmp_path / fmt, format=fmt)
        assert "modeling_llmsparse_moe.py" in table(out)["files"]
        llmsparse.load(out)
        code = out / "modeling_llmsparse_moe.py"
        code.write_text(code.read_text() + "\nprint('hello')\n")
        refused(lambda out=out: llmsparse.load(out), "modeling_llmsparse_moe.py", "extended")
