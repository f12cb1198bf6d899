"""Importers against faithfully built samples of each format, checked against the source arrays."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from moeplace.errors import InputError, MissingDependencyError
from moeplace.traces import RoutingStats, compute_stats, import_trace, load_routing
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL
from tests.conftest import DEEPSEEK, FLAME, MIXTRAL, QWEN, SWITCH, random_trace, shared_file


def _npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def hidden(rng):
    """Three requests routed through 4 hidden layers (layer 0 dense) x top-2 of 8 experts."""
    tr = random_trace(rng, 30, 3, 8, 2)
    full = np.zeros((30, 4, 2), np.uint8)
    full[:, 1:] = tr.experts
    return tr, full


def test_shared_npz_traces():
    ds = import_trace(shared_file(DEEPSEEK))
    assert ds.experts.shape == (94165, 26, 6) and ds.num_experts == 64
    assert ds.meta.moe_layer_ids == tuple(range(1, 27))
    assert len(np.unique(ds.tokens["request"])) == 999
    fl = import_trace(shared_file(FLAME))
    assert fl.weights is not None and fl.weights.shape == fl.experts.shape
    # Its README documents 255 as "no record", but the file does not declare it: refused
    # without a guess, then honoured (and counted) once the caller declares the marker.
    with pytest.raises(InputError, match="missing-id 255"):
        import_trace(shared_file(MIXTRAL))
    mx = import_trace(shared_file(MIXTRAL), missing_id=255)
    raw = np.load(shared_file(MIXTRAL))["experts"]
    lost = (raw == 255).any(axis=(1, 2))
    np.testing.assert_array_equal(mx.experts, raw[~lost])
    assert mx.dropped_tokens == lost.sum() > 0 and mx.num_experts == 8
    assert compute_stats(mx).dropped_tokens == lost.sum()
    qw = import_trace(shared_file(QWEN))
    assert qw.meta.moe_layer_ids == (0, 8, 12, 18, 23) and "step" in qw.tokens
    sw = load_routing(shared_file(SWITCH))
    assert isinstance(sw, RoutingStats) and sw.transitions is None
    assert sw.num_tokens == 206866 and sw.load.shape == (6, 128)


def test_vllm_numpy_and_openai_json(tmp_path, hidden):
    tr, full = hidden
    np.save(tmp_path / "r.npy", full)
    a = import_trace(tmp_path / "r.npy")
    np.testing.assert_array_equal(a.experts, tr.experts)
    assert a.meta.moe_layer_ids == (1, 2, 3) and a.meta.num_hidden_layers == 4
    responses = [{"id": f"cmpl-{i}", "model": "m", "usage": {"prompt_tokens": 6},
                  "choices": [{"index": 0, "routed_experts": _npy_b64(full[i * 10:(i + 1) * 10])}]}
                 for i in range(3)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in responses))
    b = import_trace(tmp_path / "r.jsonl")
    np.testing.assert_array_equal(b.experts, tr.experts)
    np.testing.assert_array_equal(b.tokens["request"], np.repeat([0, 1, 2], 10))
    np.testing.assert_array_equal(b.tokens["position"], np.tile(np.arange(10), 3))
    ph = b.tokens["phase"][:10]
    assert (ph[:6] == PHASE_PREFILL).all() and (ph[6:] == PHASE_DECODE).all()
    (tmp_path / "r.json").write_text(json.dumps(responses))
    np.testing.assert_array_equal(import_trace(tmp_path / "r.json").experts, tr.experts)


def test_sglang_per_request(tmp_path, hidden):
    tr, full = hidden
    recs = []
    for i in range(3):
        rows = full[i * 10:(i + 1) * 10].astype("<i4")
        recs.append({"text": "x", "meta_info": {
            "id": str(i), "prompt_tokens": 4, "completion_tokens": 7,
            "routed_experts": base64.b64encode(rows.tobytes()).decode()}})
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(InputError, match="--num-hidden-layers or --top-k"):
        import_trace(tmp_path / "s.jsonl")
    t = import_trace(tmp_path / "s.jsonl", top_k=2)
    np.testing.assert_array_equal(t.experts, tr.experts)
    assert t.meta.moe_layer_ids == (1, 2, 3)


def test_megatron_jsonl(tmp_path, rng):
    tr = random_trace(rng, 24, 3, 8, 2)
    lines = []
    for mb in range(2):  # two micro-batches of 12 tokens, layers 1..3
        for layer in range(3):
            idx = tr.experts[mb * 12:(mb + 1) * 12, layer].tolist()
            lines.append({"step": 0, "stage": "fwd", "block": "decoder", "layer": layer + 1,
                          "rank": 0, "num_tokens": 12, "topk": 2, "top_indices": idx})
    lines.append({"step": 0, "layer": 4, "mtp_idx": 0, "top_indices": [[0, 1]]})
    d = tmp_path / "mt"
    d.mkdir()
    (d / "router_trace_rank0.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    t = import_trace(d, num_experts=8)
    np.testing.assert_array_equal(t.experts, tr.experts)
    assert t.meta.moe_layer_ids == (1, 2, 3)
    np.testing.assert_array_equal(t.tokens["request"], np.repeat([0, 1], 12))
    bad = lines[:3]
    bad[1] = dict(bad[1], top_indices=[[1, 2, 3]] * 12, topk=3)
    (d / "router_trace_rank0.jsonl").write_text("\n".join(json.dumps(x) for x in bad))
    with pytest.raises(InputError, match="top-k 3 at layer 2 but 2 at layer 1"):
        import_trace(d)


def test_sglang_dumps_need_torch_or_say_so(tmp_path, monkeypatch):
    p = tmp_path / "expert_distribution_recorder_1.pt"
    p.write_bytes(b"not really")
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name == "torch":
            raise ImportError
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(MissingDependencyError, match=r"needs torch.*moeplace\[torch\]"):
        load_routing(p)


def test_sglang_dumps_with_torch(tmp_path, rng):
    torch = pytest.importorskip("torch")
    tr = random_trace(rng, 20, 3, 8, 2)
    H, _P = 4, 10  # hidden layer 0 dense; 8 experts + 2 redundant slots
    p2l = np.tile(np.r_[np.arange(8), [0, 1]], (H, 1))
    p2l[2] = np.r_[np.arange(8)[::-1], [3, 4]]
    log2slot = [{int(e): s for s, e in list(enumerate(row))[::-1]} for row in p2l]
    records = []
    for start, n, mode in ((0, 12, "EXTEND"), (12, 8, "DECODE")):
        ids = np.full((H, n, 8), -1, np.int32)
        for h in range(1, H):
            for j in range(n):
                ids[h, j, :2] = [log2slot[h][int(e)] for e in tr.experts[start + j, h - 1]]
        records.append({"forward_pass_id": len(records), "rank": 0,
                        "topk_ids_of_layer": torch.from_numpy(ids),
                        "positions": torch.arange(n), "forward_mode": mode,
                        "extend_seq_lens": torch.tensor([5, 7]) if mode == "EXTEND" else None})
    dump = {"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}
    path = tmp_path / "expert_distribution_recorder_1_0.pt"
    torch.save(dump, path)
    t = import_trace(path)
    np.testing.assert_array_equal(t.experts, np.sort(tr.experts, axis=2))
    assert t.meta.moe_layer_ids == (1, 2, 3)
    np.testing.assert_array_equal(t.tokens["phase"], np.r_[np.zeros(12), np.ones(8)])
    np.testing.assert_array_equal(t.tokens["request"][:12], np.repeat([0, 1], [5, 7]))
    counts = np.zeros((5, H, 8), np.int32)
    counts[:, 1:] = rng.integers(0, 9, (5, 3, 8))
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts),
                "average_utilization_rate_over_window": None}, tmp_path / "stat.pt")
    s = load_routing(tmp_path / "stat.pt")
    assert isinstance(s, RoutingStats)
    np.testing.assert_array_equal(s.load, counts.sum(0)[1:])


def test_import_errors_are_one_line(tmp_path):
    np.savez(tmp_path / "f.npz", experts=np.zeros((3, 2, 2), np.float32))
    np.savez(tmp_path / "neg.npz", experts=np.full((3, 2, 2), -1, np.int16))
    np.savez(tmp_path / "big.npz", experts=np.full((3, 2, 2), 9, np.int16))
    np.savez(tmp_path / "empty.npz", experts=np.zeros((0, 2, 2), np.int16))
    cases = {"f.npz": "not an integer", "neg.npz": "negative expert id",
             "big.npz": "expert id 9 >= num_experts=4", "empty.npz": "no tokens"}
    for name, msg in cases.items():
        with pytest.raises(InputError, match=msg) as ei:
            import_trace(tmp_path / name, num_experts=4)
        assert "\n" not in str(ei.value) and name in str(ei.value)
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(InputError, match="pass --format"):
        import_trace(tmp_path / "x.json")


def test_imported_stats_equal_direct(hidden, tmp_path):
    tr, full = hidden
    np.save(tmp_path / "r.npy", full)
    a = compute_stats(import_trace(tmp_path / "r.npy"))
    b = compute_stats(tr)
    np.testing.assert_array_equal(a.transitions, b.transitions)
