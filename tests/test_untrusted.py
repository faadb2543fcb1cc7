"""Data from outside is checked before it costs anything (issue #23, part 5).

A checkpoint may be a classmate's lab download, or any file dropped in the checkpoints folder: its JSON
is read with size and depth limits, its config is checked (types, ranges, the parameter count it implies
against a memory budget) before any tensor exists, its safetensors header (names, shapes, dtypes) is
checked without loading, and its weights must match the sha256 its card recorded at save time. A bad
file in the folder is skipped with one warning line; the rest still list and load. Every hostile file
here is built in tmp_path.
"""
import hashlib
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as read_tensors
from safetensors.torch import save_file

from moe_core.model import checkpoint
from moe_core.model.checkpoint import (
    CHECKPOINT_DIR,
    SHA_KEY,
    list_checkpoints,
    load_file,
    read_json,
)
from moe_core.model.gpt import MoEConfig, MoEGPT
from moe_core.model.params import count_params

SHIPPED = ["moe-n4", "moe-n8", "moe-n16", "moe-n32", "moe-n8-nobalance", "moe-n8-bias", "moe-n8-switch", "moe-n8-hash",
           "moe-n8-untrained"]
ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = MoEGPT(MoEConfig(n_layer=1, n_head=2, d_model=16, d_ff=8, block_size=8, vocab_size=32, n_experts=2))


def copy_checkpoint(dst_dir: Path, file: str = "m", src: str = "moe-n8", **changes) -> Path:
    """A copy of a shipped checkpoint as dst_dir/file (its name: file); `changes` edit the JSON document
    (config=dict merges into the config, the others replace the field)."""
    shutil.copy((CHECKPOINT_DIR / src).with_suffix(".safetensors"), dst_dir / f"{file}.safetensors")
    doc = json.loads((CHECKPOINT_DIR / src).with_suffix(".json").read_text(encoding="utf-8"))
    doc["name"] = file
    doc["config"].update(changes.pop("config", {}))
    doc.update(changes)
    (dst_dir / f"{file}.json").write_text(json.dumps(doc), encoding="utf-8")
    return dst_dir / file


def rewrite_card_sha(stem: Path) -> None:
    """Record the weights' current sha256 in the card, as save() would have (a hostile file can do that)."""
    doc = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    doc["card"][SHA_KEY] = hashlib.sha256(stem.with_suffix(".safetensors").read_bytes()).hexdigest()
    stem.with_suffix(".json").write_text(json.dumps(doc), encoding="utf-8")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A checkpoints folder holding the shipped checkpoints (links), made the one `load` reads."""
    d = tmp_path / "checkpoints"
    d.mkdir()
    for name in SHIPPED:
        for ext in (".json", ".safetensors"):
            (d / f"{name}{ext}").symlink_to(CHECKPOINT_DIR / f"{name}{ext}")
    monkeypatch.setattr(checkpoint, "CHECKPOINT_DIR", d)
    monkeypatch.setattr(checkpoint, "_cache", {})
    return d


def no_model_may_be_built(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built before the checkpoint was checked")

    monkeypatch.setattr(checkpoint, "MoEGPT", refuse)


# ----------------------------------------------------------------------------- the config, before any tensor


@pytest.mark.parametrize("d_model", [8192, 2**20, 2**40])
def test_a_huge_config_is_refused_fast_without_allocating(tmp_path, monkeypatch, d_model):
    """The probe: a 300-byte config with d_model = 8192 took 4.8 GB and 12 s before failing."""
    stem = copy_checkpoint(tmp_path, config={"d_model": d_model})
    no_model_may_be_built(monkeypatch)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=r"implies [\d,]+ parameters .* over the limit of [\d,]+") as e:
            load_file(stem)
        wall = time.perf_counter() - t0
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert wall < 2.0, wall
    assert traced_peak < 5 * 2**20, traced_peak
    assert grown < 256 * 1024, f"peak RSS grew by {grown} KiB"
    n = MoEConfig(d_model=d_model).param_count()
    assert f"{n:,}" in str(e.value) and "\n" not in str(e.value)


def test_the_budget_follows_the_memory_available(tmp_path, monkeypatch):
    stem = copy_checkpoint(tmp_path)
    assert load_file(stem).config.n_experts == 8
    monkeypatch.setattr(checkpoint, "_available_memory", lambda: 64 * 2**20)     # a 64 MB machine
    limit, why = checkpoint.param_budget()
    assert limit == 64 * 2**20 // (2 * checkpoint.LOAD_BYTES_PER_PARAM) and "memory available" in why
    no_model_may_be_built(monkeypatch)
    with pytest.raises(ValueError, match="over the limit of 4,194,304 .half of the 64.0 MB of memory available"):
        load_file(copy_checkpoint(tmp_path, "big", src="moe-n32"))     # 5.5 M parameters


def test_the_parameter_count_and_shapes_come_from_the_numbers_and_match_the_model():
    tiny = dict(n_layer=2, n_head=2, d_model=16, d_ff=8, block_size=8, n_experts=4, vocab_size=50)
    for kw in [{}, dict(scheme="noisy_topk"), dict(scheme="deepseek", bias_update_rate=0.01),
               dict(scheme="switch", top_k=1, capacity_factor=1.25, group_size=4), dict(scheme="expert_choice"),
               dict(scheme="base", top_k=1), dict(scheme="gshard", capacity_factor=2.0), dict(n_shared=2),
               dict(n_shared=1, activation="gelu"), dict(activation="gelu")]:
        cfg = MoEConfig(**tiny, **kw)
        model = MoEGPT(cfg)
        state = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in checkpoint.TIED}
        assert cfg.state_shapes() == state, kw
        assert cfg.param_count() == count_params(model).total, kw
    for name in SHIPPED:
        lm = checkpoint.load(name)
        assert lm.config.param_count() == count_params(lm.model).total


@pytest.mark.parametrize("change, field", [
    ({"capacity_factor": -1}, "capacity_factor"),
    ({"capacity_factor": "abc"}, "capacity_factor"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"capacity_factor": 1e9}, "capacity_factor"),
    ({"group_size": "abc"}, "group_size"),
    ({"group_size": 0}, "group_size"),
    ({"d_model": "128"}, "d_model"),
    ({"n_head": 0}, "n_head"),
    ({"n_layer": 1.5}, "n_layer"),
    ({"top_k": True}, "top_k"),
    ({"scheme": ["switch"]}, "scheme"),
    ({"activation": "relu"}, "activation"),
    ({"z_loss_coef": -0.1}, "z_loss_coef"),
    ({"n_layer": 100_000, "d_model": 4, "n_head": 1, "d_ff": 1}, "n_layer"),
    ({"surprise": 1}, "surprise"),
])
def test_a_config_with_a_bad_type_or_range_is_refused(tmp_path, monkeypatch, change, field):
    stem = copy_checkpoint(tmp_path, src="moe-n8-switch", config=change)
    no_model_may_be_built(monkeypatch)
    with pytest.raises(ValueError, match=f"bad model config: .*{field}"):
        load_file(stem)


def test_capacity_and_group_size_are_checked_when_a_config_is_made():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(scheme="switch", top_k=1, capacity_factor=float("nan"))
    with pytest.raises(ValueError, match="no capacity"):
        MoEConfig(capacity_factor=1.5)                  # softmax top-k has no capacity
    with pytest.raises(ValueError, match="group_size"):
        MoEConfig.from_dict({"group_size": 2.5})
    assert MoEConfig(scheme="switch", top_k=1, capacity_factor=1.25, group_size=64).group_size == 64


# ----------------------------------------------------------------------------- the weights, before loading


def test_weights_stored_as_int8_are_refused(tmp_path, monkeypatch):
    stem = copy_checkpoint(tmp_path)
    tensors = read_tensors(str(stem.with_suffix(".safetensors")))
    save_file({k: (v.float() * 100).to(torch.int8) for k, v in tensors.items()}, str(stem.with_suffix(".safetensors")),
              metadata={"format": checkpoint.FORMAT, "name": "m"})
    rewrite_card_sha(stem)                    # the checksum matches: the dtype alone must refuse it
    no_model_may_be_built(monkeypatch)
    with pytest.raises(ValueError, match="stored as I8; weights must be one of F16, BF16, F32"):
        load_file(stem)


def test_a_header_that_does_not_fit_the_config_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    no_model_may_be_built(monkeypatch)
    with pytest.raises(ValueError, match="does not match its config"):
        load_file(copy_checkpoint(tmp_path, "a", config={"n_layer": 6}))
    with pytest.raises(ValueError, match=r"wte.weight has shape \(4096, 128\), config needs \(4096, 256\)"):
        load_file(copy_checkpoint(tmp_path, "b", config={"d_model": 256}))


def test_flipped_bits_are_caught_by_the_checksum(tmp_path):
    stem = copy_checkpoint(tmp_path)
    path = stem.with_suffix(".safetensors")
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")           # flip bits in the tensor data only
    rng = random.Random(0)
    for pos in rng.sample(range(start * 8, len(data) * 8), 2000):
        data[pos // 8] ^= 1 << (pos % 8)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"does not match the {SHA_KEY} in its model card"):
        load_file(stem)


def test_weights_without_a_checksum_are_refused(tmp_path):
    stem = copy_checkpoint(tmp_path)
    doc = json.loads(stem.with_suffix(".json").read_text())
    for bad in (None, "", "0" * 63, "z" * 64):
        doc["card"][SHA_KEY] = bad
        stem.with_suffix(".json").write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=f"no valid {SHA_KEY}"):
            load_file(stem)


def test_save_records_the_checksum_and_a_saved_checkpoint_loads(tmp_path):
    lm = checkpoint.load("moe-n8")
    card = {"steps": 1}
    stem = checkpoint.save(lm.model, tmp_path / "copy", name="copy", recipe={}, card=card)
    assert card == {"steps": 1}                                  # the caller's dict is not changed
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert doc["card"][SHA_KEY] == hashlib.sha256(stem.with_suffix(".safetensors").read_bytes()).hexdigest()
    again = load_file(stem)
    assert again.name == "copy" and torch.equal(again.model.wte.weight, lm.model.wte.weight)


def test_the_shipped_cards_carry_the_checksum_of_their_weights():
    for name in SHIPPED:
        doc = json.loads((CHECKPOINT_DIR / f"{name}.json").read_text(encoding="utf-8"))
        digest = hashlib.sha256((CHECKPOINT_DIR / f"{name}.safetensors").read_bytes()).hexdigest()
        assert doc["card"][SHA_KEY] == digest, name


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../../../etc/passwd", "a/b", "..", "x..y", "/abs", "a\\b", "", ".hidden",
                                  "a" * 101, "moe n8", "moe-n8\n", "moe.n8"])
def test_a_checkpoint_name_must_be_a_plain_name(tmp_path, name):
    stem = copy_checkpoint(tmp_path)
    doc = json.loads(stem.with_suffix(".json").read_text())
    doc["name"] = name
    stem.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not a plain name"):
        load_file(stem)
    with pytest.raises(ValueError, match="not a plain name"):
        checkpoint.load(name)
    with pytest.raises(ValueError, match="not a plain name"):
        checkpoint.save(TINY_MODEL, tmp_path / "out", name=name, recipe={}, card={})
    assert not (tmp_path / "out.safetensors").exists()


def test_a_file_in_the_folder_cannot_point_a_name_elsewhere(folder, caplog):
    """A NAME.json whose name is a path, or another checkpoint's name, is skipped: `load` reads the
    folder's NAME.json only."""
    copy_checkpoint(folder, "evil", name="../../../etc/passwd")
    copy_checkpoint(folder, "shadow", name="moe-n4")
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        names = [d["name"] for d in list_checkpoints()]
    assert names == [d["name"] for d in list_checkpoints(CHECKPOINT_DIR)]
    assert sorted(names) == sorted(SHIPPED)
    text = caplog.text
    assert "evil.json" in text and "not a plain name" in text
    assert "shadow.json" in text and "is not its file name" in text


# ----------------------------------------------------------------------------- JSON limits, the folder


def test_read_json_has_size_and_depth_limits(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": [1, {"b": "[[[[[[[[[["}]}')                  # brackets in strings do not count
    assert read_json(p, max_depth=3) == {"a": [1, {"b": "[[[[[[[[[["}]}
    with pytest.raises(ValueError, match="nested 3 levels deep .the limit is 2"):
        read_json(p, max_depth=2)
    with pytest.raises(ValueError, match="larger than"):
        read_json(p, max_bytes=10)
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested 100000 levels deep"):
        read_json(p)
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(p)
    p.write_text('{"a": ' + "9" * 5000 + "}")                         # over Python's int digit limit
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(p)
    with pytest.raises(ValueError, match="does not exist"):
        read_json(tmp_path / "nope.json")


def test_a_deep_json_in_the_folder_is_skipped_and_the_rest_list_and_load(folder, caplog, capsys):
    from moe_core.cli import main

    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "deep.safetensors").write_bytes(b"")
    (folder / "junk.json").write_bytes(b"\x00\xff" * 10)
    copy_checkpoint(folder, "huge", config={"d_model": 8192})
    copy_checkpoint(folder, "badcf", config={"capacity_factor": "abc"})
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        names = [d["name"] for d in list_checkpoints()]
        assert sorted(names) == sorted(SHIPPED)
        assert checkpoint.load("moe-n8").config.n_experts == 8
        assert main(["models", "--json"]) == 0
        assert sorted(d["name"] for d in json.loads(capsys.readouterr().out)) == sorted(SHIPPED)
        assert main(["params", "--model", "moe-n8", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["total"] > 0
        assert main(["route", "hello world", "--model", "moe-n16", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)
    warnings = [r.getMessage() for r in caplog.records if r.name == checkpoint.__name__]
    for bad in ("deep.json", "junk.json", "huge.json", "badcf.json"):
        assert sum(bad in w for w in warnings) == 1, (bad, warnings)     # once, not once per listing
    assert all("\n" not in w for w in warnings)
    assert any("nested 100000 levels deep" in w for w in warnings)


def test_the_cli_warns_in_one_line_and_still_lists(tmp_path):
    """The probe ran `moe-lab models` over a folder with a 100k-deep JSON: 'internal error: RecursionError'."""
    assets = tmp_path / "assets"
    assets.mkdir()
    for entry in (ROOT / "assets").iterdir():
        if entry.name != "checkpoints":
            (assets / entry.name).symlink_to(entry)
    folder = assets / "checkpoints"
    folder.mkdir()
    for name in SHIPPED:
        for ext in (".json", ".safetensors"):
            (folder / f"{name}{ext}").symlink_to(CHECKPOINT_DIR / f"{name}{ext}")
    (folder / "deep.json").write_text("{\"a\":" * 100_000 + "1" + "}" * 100_000)
    env = {**os.environ, "MOE_LAB_ASSETS": str(assets)}
    p = subprocess.run([sys.executable, "-m", "moe_core", "models", "--json"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert sorted(d["name"] for d in json.loads(p.stdout)) == sorted(SHIPPED)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "deep.json" in lines[0] and "Traceback" not in p.stderr, p.stderr
