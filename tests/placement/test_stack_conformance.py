"""Exports and imports against the serving stacks' published formats and layer conventions:
SGLang (all hidden layers, torch files read with weights_only=True), TensorRT-LLM (load-balancer
YAML keyed by hidden-layer id; per-rank safetensors statistics), vLLM launch lines, and model
layouts from Hugging Face configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.errors import InputError
from moeplace.models import check_layer_ids, from_hf_config, known_layout
from moeplace.placement import contiguous, export_placement, read_placement
from moeplace.traces import load_routing, open_trace
from moeplace.traces.demo import demo_trace_path
from moeplace.traces.synthetic import PRESETS, SyntheticRouter, preset


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---- layer ids -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,H,first,last", [
    ("deepseek-v3", 61, 3, 60), ("deepseek-v2-lite", 27, 1, 26), ("kimi-k2", 61, 1, 60),
    ("qwen3-30b-a3b", 48, 0, 47), ("mixtral", 32, 0, 31), ("flame-moe-290m", 9, 1, 8)])
def test_presets_carry_real_layer_ids(name, H, first, last):
    meta = SyntheticRouter(preset(name, pool=4, num_topics=2), 0).meta
    assert meta.num_hidden_layers == H
    assert meta.moe_layer_ids == tuple(range(first, last + 1))
    assert PRESETS[name].num_layers == last - first + 1


def test_bundled_flame_trace_ids_fit_its_hidden_layers():
    m = open_trace(demo_trace_path()).meta
    assert m.num_hidden_layers == 9 and m.moe_layer_ids == tuple(range(1, 9))
    assert max(m.moe_layer_ids) < m.num_hidden_layers


def test_hf_config_layouts(tmp_path):
    def cfg(**kw):
        (tmp_path / "config.json").write_text(json.dumps(kw))
        return from_hf_config(tmp_path / "config.json")

    ds = cfg(model_type="deepseek_v3", num_hidden_layers=61, first_k_dense_replace=3,
             moe_layer_freq=1, n_routed_experts=256, num_experts_per_tok=8, n_group=8)
    assert ds.moe_layer_ids == tuple(range(3, 61)) and ds.n_group == 8
    qw = cfg(model_type="qwen2_moe", num_hidden_layers=8, decoder_sparse_step=2,
             mlp_only_layers=[3], num_experts=60, num_experts_per_tok=4)
    assert qw.moe_layer_ids == (1, 5, 7)  # (l + 1) % 2 == 0 and l not in mlp_only_layers
    mx = cfg(model_type="mixtral", num_hidden_layers=32, num_local_experts=8,
             num_experts_per_tok=2)
    assert mx.moe_layer_ids == tuple(range(32)) and mx.num_experts == 8
    with pytest.raises(InputError, match="n_routed_experts"):
        cfg(num_hidden_layers=4)


def test_layer_id_check_refuses_drift():
    v3 = known_layout("deepseek-v3")
    assert check_layer_ids(v3, None, 58, "p") == (61, list(range(3, 61)))
    with pytest.raises(InputError, match="hidden layer 0 is not an MoE layer"):
        check_layer_ids(v3, list(range(58)), 58, "p")
    with pytest.raises(InputError, match="61 hidden layers"):
        check_layer_ids(v3, None, 58, "p", num_hidden_layers=58)
    # a subset of the model's MoE layers (a trace of a few layers) is fine
    assert check_layer_ids(v3, [3, 10], 2, "p")[1] == [3, 10]


def test_deepseek_v3_preset_to_sglang_rows_at_3_to_60(tmp_path):
    tr = tmp_path / "v3.parquet"
    assert run("synth", "--preset", "deepseek-v3", "--tokens", "300", "--out", str(tr)).exit_code == 0
    plc = tmp_path / "p.json"
    r = run("solve", str(tr), "--gpus", "8", "--method", "eplb", "--replicas", "8",
            "--out", str(plc), "--json")
    assert r.exit_code == 0, r.output
    r = run("export", str(plc), "--format", "sglang", "--out", str(tmp_path / "m.json"),
            "--num-hidden-layers", "61")
    assert r.exit_code == 0, r.output
    assert "checked against deepseek-v3" in r.output
    m = np.array(json.loads((tmp_path / "m.json").read_text())["physical_to_logical_map"])
    p = json.loads(plc.read_text())
    assert m.shape == (61, 264)
    assert (m[3:61] == np.array(p["phy2log"])).all()  # 58 MoE rows at hidden layers 3..60
    assert (m[:3] == np.arange(264) % 256).all()  # dense layers 0..2: trivial rows


def test_export_refuses_ids_the_model_does_not_have(tmp_path):
    plc = contiguous(58, 256, 8, moe_layer_ids=tuple(range(58)))
    plc.save(tmp_path / "p.json")
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256,
        "num_experts_per_tok": 8}))
    r = CliRunner().invoke(main, ["export", str(tmp_path / "p.json"), "--format", "sglang",
                                  "--out", str(tmp_path / "m.json"), "--config",
                                  str(tmp_path / "config.json")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "hidden layer 0 is not an MoE layer" in r.output
    assert not (tmp_path / "m.json").exists()


# ---- SGLang torch files ----------------------------------------------------------------------
def test_pt_export_loads_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    plc = contiguous(2, 8, 4, replicas=4, moe_layer_ids=(1, 2))
    flags = export_placement(plc, "sglang", tmp_path / "m.pt", num_hidden_layers=3)
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    assert list(d) == ["physical_to_logical_map"]
    assert tuple(d["physical_to_logical_map"].shape) == (3, 12)
    assert d["physical_to_logical_map"].dtype == torch.int64
    assert f"--init-expert-location {tmp_path / 'm.pt'}" in flags
    back = read_placement(tmp_path / "m.pt", num_gpus=4, num_experts=8, moe_layer_ids=[1, 2])
    assert back.phy2log.tolist() == plc.phy2log.tolist()
    with pytest.raises(InputError, match="not a torch format"):
        export_placement(plc, "vllm-ascend", tmp_path / "v.pt")


# ---- TensorRT-LLM ------------------------------------------------------------------------------
def test_trtllm_yaml_holds_every_layer(tmp_path):
    yaml = pytest.importorskip("yaml")
    plc = contiguous(58, 256, 36, replicas=32, moe_layer_ids=tuple(range(3, 61)))
    flags = export_placement(plc, "trtllm", tmp_path / "lb.yaml")
    cfg = yaml.safe_load((tmp_path / "lb.yaml").read_text())
    assert cfg["num_slots"] == 288 and cfg["layer_updates_per_iter"] == 0
    assert sorted(cfg["initial_global_assignments"]) == list(range(3, 61))
    for j, h in enumerate(range(3, 61)):
        assert cfg["initial_global_assignments"][h] == plc.phy2log[j].tolist()
    assert "load_balancer" in flags and "--ep_size 36" in flags
    back = read_placement(tmp_path / "lb.yaml", num_gpus=36)
    assert back.moe_layer_ids == tuple(range(3, 61)) and back == plc


def test_trtllm_yaml_validation(tmp_path):
    (tmp_path / "a.yaml").write_text("num_slots: 4\ninitial_global_assignments:\n  3: [0, 1, 2]\n")
    with pytest.raises(InputError, match="not a list of 4"):
        read_placement(tmp_path / "a.yaml", num_gpus=2)


def _write_trtllm_dir(d, counts, co=None, k=2):
    st = pytest.importorskip("safetensors.numpy")
    d.mkdir()
    N = counts[0][next(iter(counts[0]))].shape[0]
    (d / "meta_info.json").write_text(json.dumps({"num_experts": N, "num_experts_per_token": k}))
    for r, tensors in enumerate(counts):
        st.save_file(tensors, str(d / f"rank{r}.safetensors"))
    for r, tensors in enumerate(co or []):
        st.save_file(tensors, str(d / f"cooccurrence_rank{r}.safetensors"))


def test_trtllm_statistics_import(tmp_path, rng):
    N, layers, iters = 6, [3, 4], [100, 101, 102]
    counts = [{f"{i}_{l}": rng.integers(0, 50, N).astype(np.int32) for i in iters for l in layers}
              for _ in range(2)]
    co = [{f"{i}_{l}": rng.integers(0, 9, (N, N)).astype(np.int32) for i in iters for l in layers}
          for _ in range(2)]
    _write_trtllm_dir(tmp_path / "stats", counts, co)
    s = load_routing(tmp_path / "stats")  # detected as trtllm
    assert s.meta.moe_layer_ids == (3, 4) and s.meta.top_k == 2
    for j, l in enumerate(layers):  # naive sum over ranks and iterations
        want = sum(c[f"{i}_{l}"].astype(np.int64) for c in counts for i in iters)
        assert s.load[j].tolist() == want.tolist()
        want_co = sum(c[f"{i}_{l}"].astype(np.int64) for c in co for i in iters)
        off = ~np.eye(N, dtype=bool)
        assert (s.coactivation[j][off] == want_co[off]).all()
        assert (np.diag(s.coactivation[j]) == s.load[j]).all()
    r = run("analyze", str(tmp_path / "stats"), "--format", "trtllm", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["moe_layer_ids"] == [3, 4]


def test_trtllm_statistics_refuse_bad_headers(tmp_path, rng):
    counts = [{"100_3": rng.integers(0, 50, 6).astype(np.int32)}]
    _write_trtllm_dir(tmp_path / "s", counts)
    f = tmp_path / "s" / "rank0.safetensors"
    raw = bytearray(f.read_bytes())
    raw[:8] = (10**9).to_bytes(8, "little")  # header longer than the file
    f.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="header"):
        load_routing(tmp_path / "s")
    _write_trtllm_dir(tmp_path / "t", [{"100_3": np.zeros(5, np.int32)}])
    (tmp_path / "t" / "meta_info.json").write_text(json.dumps(
        {"num_experts": 6, "num_experts_per_token": 2}))
    with pytest.raises(InputError, match=r"shape \[5\] is not \[6\]"):
        load_routing(tmp_path / "t")


# ---- launch lines ------------------------------------------------------------------------------
def test_launch_lines_work_as_printed(tmp_path):
    plc = contiguous(2, 8, 4, replicas=4, moe_layer_ids=(0, 1))
    for fmt, name in (("vllm-pr49572", "m.json"), ("vllm-pr41141", "m.jsonl")):
        flags = export_placement(plc, fmt, tmp_path / name)
        assert "--enable-eplb" in flags and "--enable-expert-parallel" in flags
        cfg = json.loads(flags.split("--eplb-config '")[1].split("'")[0])
        assert cfg["num_redundant_experts"] == 4
    assert "initial_expert_map_path" in export_placement(plc, "vllm-pr49572", tmp_path / "a.json")
    cfg41141 = export_placement(plc, "vllm-pr41141", tmp_path / "b.jsonl")
    assert '"initial_mapping_path"' in cfg41141 and '"disable_online_rebalancing":true' in cfg41141
    assert "w8a8_dynamic" in export_placement(plc, "vllm-ascend", tmp_path / "c.json")
