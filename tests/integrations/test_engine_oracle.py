"""The engines' own code is the oracle: moeplace's ``eplb`` against vLLM 0.34.0's
``DefaultEplbPolicy`` and SGLang 0.5.23's EPLB algorithms, run from the installed engines in a
subprocess (``tests/engines.py``); skipped where an engine is not installed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moeplace.placement import Placement
from moeplace.solvers.baselines import eplb
from tests.engines import VLLM_PRELUDE, engine_path, run_forked

# (GPUs, nodes, replicas, groups, experts): one node and several, no replicas and many, no
# groups, groups dividing over nodes (hierarchical) and not (global).
SETTINGS = [(8, 1, 0, 1, 64), (8, 2, 8, 4, 64), (16, 4, 16, 8, 64), (32, 4, 32, 8, 256),
            (16, 2, 16, 1, 128), (8, 4, 24, 8, 32), (8, 1, 8, 8, 64), (16, 4, 0, 8, 64),
            (6, 3, 6, 2, 30), (8, 4, 8, 2, 32)]
LAYERS = 6


def _loads(i: int, n: int) -> np.ndarray:
    """Continuous random loads over three magnitudes: no two group sums, loads per copy or
    pack sums tie (float32 values, exact in the JSON round trip)."""
    rng = np.random.default_rng(1000 + i)
    return (rng.random((LAYERS, n)) * rng.choice([1.0, 10.0, 100.0], (LAYERS, n))).astype(np.float32)


def _engine_layouts(engine: str, prelude: str, code: str, tmp_path) -> list[np.ndarray]:
    engine_path(engine)
    cases = [{"load": _loads(i, N).tolist(), "G": G, "M": M, "R": R, "g": g}
             for i, (G, M, R, g, N) in enumerate(SETTINGS)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    # forked from one interpreter per engine that ran ``prelude`` (tests/engines.py)
    r = run_forked(engine, prelude, f"import json\ncases = json.load(open({str(tmp_path / 'cases.json')!r}))\n"
                   + textwrap.dedent(code), timeout=600)
    if r.returncode and "ModuleNotFoundError" in r.stderr:
        pytest.skip(f"{engine}'s EPLB modules do not import: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr
    return [np.array(x) for x in json.loads(r.stdout.strip().splitlines()[-1])]


def _compare(ref: list[np.ndarray]) -> None:
    for i, ((G, M, R, g, N), want) in enumerate(zip(SETTINGS, ref, strict=True)):
        got = eplb(_loads(i, N), G, M, R, num_groups=g).phy2log
        assert want.shape == got.shape == (LAYERS, N + R)
        # slot for slot, hence the same expert set on every GPU of every layer
        for layer in range(LAYERS):
            assert got[layer].tolist() == want[layer].tolist(), (G, M, R, g, layer)


def test_eplb_equals_vllm_default_policy(tmp_path):
    code = """
    import numpy as np, torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    out = []
    for c in cases:
        w = torch.tensor(c["load"], dtype=torch.float32)
        N = w.shape[1]
        out.append(DefaultEplbPolicy.rebalance_experts(w, N + c["R"], c["g"], c["M"],
                                                       c["G"]).tolist())
    print(json.dumps(out))
    """
    _compare(_engine_layouts("vllm", VLLM_PRELUDE, code, tmp_path))


SGLANG_BOOT = """
import importlib.abc, importlib.machinery, os, sys, types
import torch.utils._triton as _tt
# torch decides that there is no triton before the shim below exists (and loads the modules
# that would look again), so only SGLang's module-level `import triton` sees the shim: its
# kernels never run in these CPU-only checks. Never a real triton install.
assert not _tt.has_triton_package()
import torch._dynamo, torch._inductor.runtime.triton_compat, torch._inductor.codecache  # noqa
import torch.utils.flop_counter  # noqa


class _Any:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else _Any()
    def __getattr__(self, n): return _Any()
    def __mro_entries__(self, bases): return (object,)


class _Stub(types.ModuleType):
    def __getattr__(self, n):
        if n.startswith("__"):
            raise AttributeError(n)
        return _Any()


class _Shim(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        f = sys._getframe(1)
        while f is not None and f.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
            f = f.f_back
        if f is not None and f.f_globals.get("__name__", "").split(".")[0] in ("torch", "functorch"):
            return None  # torch looks for triton itself: it must find none
        if name.split(".")[0] == "triton":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Stub(spec.name); m.__path__ = []; m.__version__ = "3.0.0"
        return m
    def exec_module(self, m): pass


sys.meta_path.insert(0, _Shim())
# SGLang's package __init__ imports its front-end language (IPython and more); the engine's
# runtime code (sglang.srt) needs none of it, so it is imported under a bare package.
for p in sys.path:
    if os.path.isdir(os.path.join(p, "sglang", "srt")):
        pkg = types.ModuleType("sglang")
        pkg.__path__ = [os.path.join(p, "sglang")]
        sys.modules["sglang"] = pkg
        break
"""


# Modules SGLang's argument resolution imports at module level that these CPU-only checks never
# call into (vision, tokenizer, kernel and client packages): import shims, never installs.
SGLANG_RESOLVE_STUBS = ("gguf", "compressed_tensors", "sentencepiece", "tvm_ffi", "IPython",
                        "torchvision", "einops", "openai")
# Both SGLang checks fork from one interpreter that ran this (the EPLB algorithms, pure torch,
# call into none of the stubbed packages).
SGLANG_PRELUDE = SGLANG_BOOT.replace('name.split(".")[0] == "triton"',
                                     f'name.split(".")[0] in {("triton", *SGLANG_RESOLVE_STUBS)!r}')
assert SGLANG_PRELUDE != SGLANG_BOOT


def test_eplb_equals_sglang_auto_choice(tmp_path):
    # SGLang's `auto`: deepseek_hierarchical when groups divide over nodes, else deepseek
    # (always the global policy). vLLM passes groups=1 for models without groups, where
    # SGLang passes None; both then run the global policy on several nodes.
    code = """
    import torch
    from sglang.srt.eplb.eplb_algorithms import compute_algorithm, rebalance_experts
    out = []
    for c in cases:
        w = torch.tensor(c["load"], dtype=torch.float32)
        N = w.shape[1]
        P = N + c["R"]
        g = None if c["g"] == 1 else c["g"]
        algo = compute_algorithm("auto", g, c["M"])
        phy, _, _ = rebalance_experts(w[None], P, P // c["G"], g, c["M"], algo)
        out.append(phy.tolist())
    print(json.dumps(out))
    """
    _compare(_engine_layouts("sglang", SGLANG_PRELUDE, code, tmp_path))


# ---- exports through SGLang's own argument parsing, topology check and loader -------------------
DSV3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
        "num_key_value_heads": 128, "vocab_size": 129280, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "n_shared_experts": 1, "max_position_embeddings": 163840,
        "rope_theta": 10000, "torch_dtype": "bfloat16", "moe_layer_freq": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False}


# In SGLang's interpreter: the initial expert-location map each EP rank computes, as its
# scheduler process does at start-up (published parallel topology, then
# compute_initial_expert_location_metadata).
SGLANG_RANK_MAPS = """
import json, torch
from sglang.srt.server_args import prepare_server_args
from sglang.srt.runtime_context import publish, SpawnRanks, spawn_world_rank, get_parallel
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.eplb import expert_location as el

# SGLang's model registry imports every model's kernels, which do not import without a GPU;
# what DeepseekV2ForCausalLM.get_model_config_for_expert_location returns, from the config.
el.ModelConfigForExpertLocation.from_model_config = staticmethod(
    lambda mc: el.ModelConfigForExpertLocation(mc.hf_config.num_hidden_layers,
                                               mc.hf_config.n_routed_experts,
                                               mc.hf_config.n_group))


def rank_maps(sa, ranks):
    mc = ModelConfig.from_server_args(sa)
    maps = []
    for r in ranks:
        publish(sa, role="scheduler", ranks=SpawnRanks(
            world_rank=spawn_world_rank(sa, tp_rank=r, pp_rank=0), gpu_id=r % 8))
        md = el.compute_initial_expert_location_metadata(mc, get_parallel().moe_ep_rank)
        maps.append([md.ep_size, md.physical_to_logical_map_cpu.tolist()])
    return maps
"""


def dsv3_model_dir(tmp_path: Path) -> Path:
    """A DeepSeek-V3 model directory holding only its config.json (what SGLang reads)."""
    model = tmp_path / "dsv3"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(DSV3))
    return model


def dsv3_placement(G: int, M: int, R: int, seed: int) -> Placement:
    """A random DeepSeek-V3 placement (58 MoE layers, hidden layers 3-60, 256 experts + R)."""
    rng = np.random.default_rng(seed)
    N = 256
    phy = np.stack([np.concatenate([rng.permutation(N), rng.choice(N, R, replace=False)])
                    for _ in range(58)])
    return Placement(phy, G, M, N, moe_layer_ids=tuple(range(3, 61)), colocated=True)


def test_sglang_loads_exports_under_the_printed_launch_line(tmp_path):
    import shlex

    from moeplace.models import known_layout
    from moeplace.placement.exports import export_placement

    pytest.importorskip("torch")
    engine_path("sglang")
    model = dsv3_model_dir(tmp_path)
    G, M, R, N = 32, 4, 32, 256
    plc = dsv3_placement(G, M, R, 7)
    phy = plc.phy2log
    cases = []
    for name in ("p.json", "p.pt"):
        flags = export_placement(plc, "sglang", tmp_path / name, layout=known_layout("deepseek-v3"))
        line = next(x for x in flags.splitlines() if "sglang.launch_server" in x)
        assert "--tp-size 32" in line and "--nnodes 4" in line
        argv = shlex.split(line.split("sglang.launch_server", 1)[1])
        argv[argv.index("--model-path") + 1] = str(model)
        for node in range(M):
            a = list(argv)
            a[a.index("--node-rank") + 1] = str(node)
            cases.append({"argv": [*a, "--device", "cpu"], "ranks": [node * 8, node * 8 + 7]})
    # The bare hint export printed before: SGLang refuses its topology at start-up.
    cases.append({"argv": ["--model-path", str(model), "--device", "cpu", "--ep-size", "32",
                           "--init-expert-location", str(tmp_path / "p.json"),
                           "--ep-num-redundant-experts", "32"], "ranks": [0]})
    # What `apply` prints: the rewritten checkpoint served with SGLang's trivial layout.
    from moeplace.placement.exports import apply_launch_hint

    hint = next(x for x in apply_launch_hint(plc, str(model)).splitlines() if "launch_server" in x)
    argv = shlex.split(hint.split("sglang.launch_server", 1)[1].split(" (--init")[0])
    cases.append({"argv": [*argv, "--device", "cpu"], "ranks": [7]})
    # Why export checks the deployment: SGLang loads the 288-slot file under
    # --ep-num-redundant-experts 0 without a word.
    cases.append({"argv": ["--model-path", str(model), "--device", "cpu", "--tp-size", "32",
                           "--ep-size", "32", "--init-expert-location", str(tmp_path / "p.json")],
                  "ranks": [0]})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    code = SGLANG_RANK_MAPS + f"""
out = []
for c in json.load(open({str(tmp_path / 'cases.json')!r})):
    try:
        sa = prepare_server_args(c["argv"])
        sa.resolve_once()
        sa.check_server_args()
        out.append({{"ok": rank_maps(sa, c["ranks"])}})
    except Exception as e:  # the engine's refusal is the answer
        out.append({{"error": str(e).splitlines()[0]}})
print(json.dumps(out))
"""
    r = run_forked("sglang", SGLANG_PRELUDE, code, timeout=900)
    if r.returncode and "ModuleNotFoundError" in r.stderr:
        pytest.skip("SGLang's server arguments do not import: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == 2 * M + 3
    trivial, silent = res[-2:]
    res = res[:-2]
    (ep, rows), = trivial["ok"]
    assert ep == G and (np.array(rows) == np.arange(N)).all()
    (ep, rows), = silent["ok"]
    assert np.array(rows).shape == (61, N + R)  # accepted, though 288 != 256 + 0
    for got in res[:-1]:
        assert "ok" in got, got
        for ep, rows in got["ok"]:
            rows = np.array(rows)
            assert ep == G and rows.shape == (61, N + R)
            # all 58 MoE rows are the placement; dense rows SGLang's trivial layout
            assert (rows[3:] == phy).all()
            assert (rows[:3] == np.arange(N + R) % N).all()
    assert "parallel topology is inconsistent" in res[-1].get("error", ""), res[-1]
