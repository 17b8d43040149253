"""Damaged compact checkpoints are refused before any weight is loaded, with one line naming the tensor and problem.

These are the checks of the compact format itself (config.json's sparsity_config against the safetensors files),
which every compact folder gets, also one without a checksum table (written by ``save_pretrained``, or by another
tool): the folders here have their table removed, as the table would refuse every edit first. The table's own tests
are in ``test_integrity_checksums.py``.
"""

import json
import shutil
import struct

import pytest
import torch
from conftest import tiny_model, without_checksums
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_sparse import prune_model

import llmsparse
from llmsparse.checkpoint.integrity import tensor_crc32
from llmsparse.checkpoint.save import save
from llmsparse.cli import main
from llmsparse.core.errors import LlmsparseError

NM = "model.layers.0.mlp.gate_proj"  # 2:4 in prune_model's alternation
BITMAP = "model.layers.0.mlp.up_proj"  # 70% unstructured: bitmap


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model("llama")
    prune_model(model, ["2:4", 0.7])
    out = save(model, tmp_path_factory.mktemp("ckpt") / "c", format="compact", max_shard_size="20KB")
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["modules"]
    assert modules[NM]["format"] == "2:4" and modules[BITMAP]["format"] == "bitmap"
    return without_checksums(out)


@pytest.fixture
def ckpt(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "c")


def shard_of(folder, key):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][key]


def rewrite(folder, key, change):
    """Rewrite the shard holding ``key`` with ``change(tensor)`` in its place (a consistent safetensors file)."""
    path = shard_of(folder, key)
    tensors = load_file(path)
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors[key]


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config["quantization_config"]["sparsity_config"])
    path.write_text(json.dumps(config))


def refused(folder, *fragments, **kwargs):
    with pytest.raises(LlmsparseError) as info:
        llmsparse.load(folder, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_the_intact_copy_loads(ckpt):
    assert sum(isinstance(m, llmsparse.SparseLinear) for m in llmsparse.load(ckpt).modules()) == 14


def test_truncated_shard_names_the_first_tensor_cut_short(ckpt):
    path = shard_of(ckpt, f"{NM}.values")
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])  # the safetensors layout: u64 header size, JSON header, data
    header = {k: v for k, v in json.loads(data[8:8 + length]).items() if k != "__metadata__"}
    kept = len(data) - 100 - 8 - length  # data bytes left after cutting 100
    cut = sorted((v["data_offsets"][0], k) for k, v in header.items() if v["data_offsets"][1] > kept)
    assert 0 < len(cut) < len(header)
    path.write_bytes(data[:-100])
    refused(ckpt, cut[0][1], path.name, f"({len(cut)} of its tensors cut short)", "truncated")


def test_edited_header_shape_names_the_tensor_and_the_expected_size(ckpt):
    rewrite(ckpt, f"{NM}.values", lambda t: t[:, :-2])
    message = refused(ckpt, f"{NM}.values", "file edited or truncated", "2:4 format of a [64, 32] weight")
    assert "896 elements" in message and "(1024)" in message  # 64 x 14 found, 64 x 16 needed


def test_edited_dtype(ckpt):
    rewrite(ckpt, f"{BITMAP}.offsets", lambda t: t.to(torch.int64))
    refused(ckpt, f"{BITMAP}.offsets", "I64", "needs I32")


def test_flipped_bytes_fail_the_checksum_unless_verify_is_off(ckpt):
    rewrite(ckpt, f"{NM}.values", lambda t: t * 1.5)
    refused(ckpt, f"{NM}.values", "CRC-32", "edited or corrupted")
    loaded = llmsparse.load(ckpt, verify=False)  # headers and shapes are still consistent
    assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_unknown_checkpoint_version(ckpt):
    edit_config(ckpt, lambda sc: sc.update(version=2))
    refused(ckpt, "sparsity_config version 2 is not supported", "upgrade llmsparse")


def test_unknown_format_version_names_the_module(ckpt):
    edit_config(ckpt, lambda sc: sc["modules"][BITMAP]["layout"].update(version=7))
    refused(ckpt, BITMAP, "bitmap format version 7 is not supported")


def test_unknown_format(ckpt):
    edit_config(ckpt, lambda sc: sc["modules"][NM]["layout"].update(format="nm-v9"))
    refused(ckpt, NM, "unknown sparse format 'nm-v9'")


def test_index_pointing_at_the_wrong_shard(ckpt):
    path = ckpt / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    key = f"{NM}.indices"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    path.write_text(json.dumps(index))
    refused(ckpt, key, "mismatched index")


def test_index_missing_a_tensor_or_naming_a_missing_shard(ckpt):
    path = ckpt / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = index["weight_map"].pop(f"{BITMAP}.bitmap")
    path.write_text(json.dumps(index))
    refused(ckpt, f"{BITMAP}.bitmap", "not in the index")
    index["weight_map"][f"{BITMAP}.bitmap"] = shard
    (ckpt / shard).unlink()
    path.write_text(json.dumps(index))
    first = min(k for k, v in index["weight_map"].items() if v == shard)
    refused(ckpt, first, shard, "missing")


def test_edited_layout_shape(ckpt):
    edit_config(ckpt, lambda sc: sc["modules"][NM]["layout"].update(shape=[64, 64]))
    refused(ckpt, NM)


def test_module_the_model_does_not_have(ckpt):
    """A module renamed consistently in config.json, the index and the shard: the model has no such module."""
    new = "model.layers.0.mlp.fancy_proj"
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for part in ("values", "indices"):
        path = ckpt / index["weight_map"].pop(f"{NM}.{part}")
        tensors = load_file(path)
        tensors[f"{new}.{part}"] = tensors.pop(f"{NM}.{part}")
        save_file(tensors, path, metadata={"format": "pt"})
        index["weight_map"][f"{new}.{part}"] = path.name
    index_path.write_text(json.dumps(index))

    def rename(sc):
        sc["modules"][new] = sc["modules"].pop(NM)

    edit_config(ckpt, rename)
    refused(ckpt, new, "no such module")


def test_consistent_edits_caught_by_the_format_checks(ckpt):
    """Edits that keep shapes and checksums right still break the format's own invariants."""
    def set_crc(key, tensor):
        module, part = key.rsplit(".", 1)
        edit_config(ckpt, lambda sc: sc["modules"][module]["tensors"][part].update(crc32=tensor_crc32(tensor)))

    key = f"{NM}.indices"
    with safe_open(shard_of(ckpt, key), "pt") as f:
        original = f.get_tensor(key)
    set_crc(key, rewrite(ckpt, key, lambda t: torch.zeros_like(t)))  # every position 0: duplicates in each group
    refused(ckpt, key, "not distinct and sorted")
    set_crc(key, rewrite(ckpt, key, lambda t: original))

    key = f"{BITMAP}.offsets"
    set_crc(key, rewrite(ckpt, key, lambda t: t + 10_000))
    refused(ckpt, BITMAP, "offsets overlap or run past the values")


def test_edited_non_zero_count(ckpt):
    edit_config(ckpt, lambda sc: sc["modules"][BITMAP].update(nnz=sc["modules"][BITMAP]["nnz"] + 1))
    refused(ckpt, f"{BITMAP}.values", "non-zeros")


def test_cli_reports_damage_in_one_line(ckpt, capsys, tmp_path):
    path = shard_of(ckpt, f"{BITMAP}.values")
    path.write_bytes(path.read_bytes()[:50])
    assert main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmsparse: error:") and "truncated" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(ckpt), "--format", "dense", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
