"""Property: the byte-level checkpoint rewriter agrees with numpy indexing of the same tensors
(permute_state_dict), for any placement, dtype, layout and shard split, and inverts exactly."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.placement import random_placement
from moeplace.placement.checkpoint import rewrite_checkpoint
from moeplace.placement.permute import permute_state_dict

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _state_dict(rng, L, N, per_expert, dtype):
    sd = {}
    for l in range(L):
        sd[f"model.layers.{l}.mlp.gate.weight"] = rng.standard_normal((N, 3)).astype(dtype)
        sd[f"model.layers.{l}.mlp.gate.e_score_correction_bias"] = rng.standard_normal(N).astype(
            np.float32)
        sd[f"model.layers.{l}.self_attn.o_proj.weight"] = rng.standard_normal((3, 3)).astype(dtype)
        if per_expert:
            for e in range(N):
                for part in ("gate_proj", "up_proj", "down_proj"):
                    sd[f"model.layers.{l}.mlp.experts.{e}.{part}.weight"] = rng.standard_normal(
                        (2, 3)).astype(dtype)
        else:
            sd[f"model.layers.{l}.mlp.experts.gate_up_proj"] = rng.standard_normal(
                (N, 4, 3)).astype(dtype)
            sd[f"model.layers.{l}.mlp.experts.down_proj"] = rng.standard_normal((N, 3, 2)).astype(
                dtype)
    return sd


def _save(sd, d: Path, shards: int) -> None:
    d.mkdir()
    names = list(sd)
    if shards == 1:
        safetensors_numpy.save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_numpy.save_file({k: sd[k] for k in chunk}, d / fname)
        weight_map.update({k: fname for k in chunk})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _load(d: Path):
    out = {}
    for f in d.glob("*.safetensors"):
        out.update(safetensors_numpy.load_file(f))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), L=st.integers(1, 3), G=st.sampled_from([1, 2, 4]),
       per_expert=st.booleans(), shards=st.integers(1, 3),
       dtype=st.sampled_from([np.float32, np.float16, np.int8]))
def test_byte_rewrite_equals_numpy_permutation_and_inverts(seed, L, G, per_expert, shards, dtype):
    rng = np.random.default_rng(seed)
    N = 8
    sd = _state_dict(rng, L, N, per_expert, dtype)
    plc = random_placement(L, N, G, seed=seed, moe_layer_ids=tuple(range(L)))
    root = Path(tempfile.mkdtemp())
    try:
        _save(sd, root / "src", shards)
        rewrite_checkpoint(root / "src", root / "dst", plc)
        got, want = _load(root / "dst"), permute_state_dict(sd, plc)
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
        if shards > 1:  # every name the index lists is in the shard it names
            index = json.loads((root / "dst" / "model.safetensors.index.json").read_text())
            for k, f in index["weight_map"].items():
                assert k in safetensors_numpy.load_file(root / "dst" / f), k
        rewrite_checkpoint(root / "dst", root / "back", invert=True)
        for f in (root / "src").glob("*.safetensors"):
            assert (root / "back" / f.name).read_bytes() == f.read_bytes(), f.name
        if shards > 1:  # the index is rewritten in its own layout; its mapping is restored
            index = root / "src" / "model.safetensors.index.json"
            assert json.loads((root / "back" / index.name).read_text()) == json.loads(
                index.read_text())
    finally:
        shutil.rmtree(root)
