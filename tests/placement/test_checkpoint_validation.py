"""`moeplace apply` input checks: safetensors headers (types, offsets inside the file, ordered,
non-overlapping, sized by dtype x shape), the index's shard paths (inside the checkpoint),
config.json and the sidecar. Each failure: one typed error, one CLI line, exit 2, no output."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from moeplace.placement import Placement
from moeplace.placement.checkpoint import SIDECAR, rewrite_checkpoint
from tests.bad_input import cli_fails, raises_input

N, H = 4, 2  # experts, hidden size


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for h in (0, 1):
        out[f"model.layers.{h}.mlp.gate.weight"] = rng.random((N, H), np.float32)
        for e in range(N):
            out[f"model.layers.{h}.mlp.experts.{e}.w1.weight"] = rng.random((H, H), np.float32)
    return out


def _header(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    header, data, pos = {}, b"", 0
    for name, a in tensors.items():
        raw = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    return header, data


def _write(path, header, data: bytes, raw_header: bytes | None = None):
    text = raw_header if raw_header is not None else json.dumps(
        header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    header, data = _header(_tensors())
    _write(d / "model.safetensors", header, data)
    (d / "config.json").write_text(json.dumps({"model_type": "x", "num_experts": N}))
    return d


@pytest.fixture
def plc(tmp_path):
    p = Placement(np.array([[1, 0, 3, 2], [2, 3, 0, 1]]), num_gpus=2, num_experts=N,
                  moe_layer_ids=(0, 1))
    return p.save(tmp_path / "p.json")


def test_good_checkpoint_applies_and_inverts(ckpt, plc, tmp_path):
    rewrite_checkpoint(ckpt, tmp_path / "out", Placement.load(plc))
    rewrite_checkpoint(tmp_path / "out", tmp_path / "back", invert=True)
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == \
        (ckpt / "model.safetensors").read_bytes()


def _entry_edit(fn):
    def edit(ckpt):
        header, data = _header(_tensors())
        fn(header)
        _write(ckpt / "model.safetensors", header, data)
    return edit


def _first(h):
    return h["model.layers.0.mlp.experts.0.w1.weight"]


def _raw_edit(raw_header: bytes, data: bytes = b""):
    def edit(ckpt):
        _write(ckpt / "model.safetensors", None, data, raw_header)
    return edit


def _swap_offsets(h):
    a, b = h["model.layers.0.mlp.experts.0.w1.weight"], h["model.layers.0.mlp.experts.1.w1.weight"]
    b["data_offsets"] = list(a["data_offsets"])  # two tensors on the same bytes


HEADER_CASES = [
    ("header a list", _raw_edit(b"[1, 2]"), "not an object", "header"),
    ("header deep", _raw_edit(b"[" * 50_000 + b"]" * 50_000), "nested too deeply", "header"),
    ("header not JSON", _raw_edit(b"{nope"), "not valid JSON", "header"),
    ("entry a list", _entry_edit(lambda h: h.update({"x": [1]})), "not a tensor entry", "x"),
    ("no shape", _entry_edit(lambda h: _first(h).pop("shape")), "missing", "shape"),
    ("no offsets", _entry_edit(lambda h: _first(h).pop("data_offsets")), "missing",
     "data_offsets"),
    ("dtype unknown", _entry_edit(lambda h: _first(h).update(dtype="F128")),
     "not a safetensors dtype", "dtype"),
    ("shape text", _entry_edit(lambda h: _first(h).update(shape="2x2")), "not a list",
     "shape"),
    ("shape negative", _entry_edit(lambda h: _first(h).update(shape=[-2, -2])), "below 0",
     "shape"),
    ("offsets reversed", _entry_edit(lambda h: _first(h).update(
        data_offsets=_first(h)["data_offsets"][::-1])), "begin <= end", "data_offsets"),
    ("offsets negative", _entry_edit(lambda h: _first(h).update(data_offsets=[-16, 0])),
     "below 0", "data_offsets"),
    ("offsets three", _entry_edit(lambda h: _first(h).update(data_offsets=[0, 8, 16])),
     "more than 2", "data_offsets"),
    ("span vs shape", _entry_edit(lambda h: _first(h).update(shape=[2, 3])), "needs 24",
     "data_offsets"),
    ("overlap", _entry_edit(_swap_offsets), "overlap", "data_offsets"),
    ("beyond file", _entry_edit(lambda h: [e.update(data_offsets=[o + 64 for o in
                                                                e["data_offsets"]])
                                          for e in h.values()]), "hole", "data_offsets"),
    ("metadata not strings", _entry_edit(lambda h: h.update(__metadata__={"a": 1})),
     "object of strings", "__metadata__"),
]


@pytest.mark.parametrize("name,edit,needle,field", HEADER_CASES,
                         ids=[c[0] for c in HEADER_CASES])
def test_bad_safetensors_header(ckpt, plc, tmp_path, name, edit, needle, field):
    edit(ckpt)
    out = tmp_path / "out"
    err = raises_input(lambda: rewrite_checkpoint(ckpt, out, Placement.load(plc)), needle)
    assert field in err.field, err.field
    cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", out], needle)
    assert not out.exists()


def test_header_length_and_truncation(ckpt, plc, tmp_path):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o"], "-byte header")
    f.write_bytes(raw[:5])
    cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o"], "8-byte")
    f.write_bytes(raw[:-10])  # data shorter than the header says
    cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o"], "truncated")
    assert not (tmp_path / "o").exists()


def _index(ckpt, weight_map):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))


def test_index_paths_stay_inside_checkpoint(ckpt, plc, tmp_path):
    names = list(_tensors())
    outside = tmp_path / "outside.safetensors"
    os.replace(ckpt / "model.safetensors", outside)
    for target, needle in [("../outside.safetensors", "points outside"),
                           (str(outside), "points outside"),
                           ("link.safetensors", "a symlink leads out")]:
        if target == "link.safetensors":
            os.symlink(outside, ckpt / "link.safetensors")
        _index(ckpt, dict.fromkeys(names, target))
        raises_input(lambda: rewrite_checkpoint(ckpt, tmp_path / "o", Placement.load(plc)),
                     needle, "weight_map")
        cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o"], needle)
        assert not (tmp_path / "o").exists()
    for wm, needle in [([1, 2], "not an object"), ({}, "not an object"),
                       (dict.fromkeys(names, 5), "is not a file name")]:
        _index(ckpt, wm)
        cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o"], needle)


CONFIG_CASES = [
    ({"n_group": 3, "topk_group": 1}, "3 groups do not divide 4 experts"),
    ({"n_group": "two"}, "is not an integer"),
    ({"n_group": 2, "topk_group": 5}, "topk_group must lie in 1..n_group"),
    ({"n_group": -1}, "below 1"),
    ([1, 2], "not an object"),
]


@pytest.mark.parametrize("cfg,needle", CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_bad_config(ckpt, plc, tmp_path, cfg, needle):
    (ckpt / "config.json").write_text(json.dumps(cfg))
    raises_input(lambda: rewrite_checkpoint(ckpt, tmp_path / "o", Placement.load(plc)), needle)
    cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o"], needle)
    (ckpt / "config.json").write_text("{broken")
    cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o"], "not valid JSON")


def test_bad_sidecar(ckpt, plc, tmp_path):
    rewrite_checkpoint(ckpt, tmp_path / "a", Placement.load(plc))
    side = tmp_path / "a" / SIDECAR
    good = side.read_text()
    for text, needle in [(good[: len(good) // 2], "not valid JSON"),
                         ("[]", "not an object"),
                         (json.dumps({"perm": {"0": [0, 0, 1, 2]}}), "not a permutation"),
                         (json.dumps({"perm": {"0": [1, 0]}}), "a permutation of 2 experts"),
                         (json.dumps({"perm": {"0": [1, 0, 3, 2, 5, 4]}}), "which has 4"),
                         (json.dumps({"perm": {"7": [1, 0, 3, 2]}}), "layer 7"),
                         (json.dumps({"perm": {"x": [1, 0, 3, 2]}}), "not a layer number"),
                         (json.dumps({"perm": {"0": "0123"}}), "not a list")]:
        side.write_text(text)
        for args in (["--invert"], [plc]):
            cli_fails(["apply", *args, "--checkpoint", tmp_path / "a", "--out", tmp_path / "b"],
                      needle)
            assert not (tmp_path / "b").exists()


def test_duplicate_moe_layers_refused(ckpt, plc, tmp_path):
    raises_input(lambda: rewrite_checkpoint(ckpt, tmp_path / "o", Placement.load(plc),
                                            moe_layer_ids=[0, 0]), "named twice")
    cli_fails(["apply", plc, "--checkpoint", ckpt, "--out", tmp_path / "o", "--moe-layers",
               "0,0"], "appears twice")
    assert not (tmp_path / "o").exists()
