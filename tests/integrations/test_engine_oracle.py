"""The engines' own code is the oracle: moeplace's ``eplb`` against vLLM 0.34.0's
``DefaultEplbPolicy`` and SGLang 0.5.23's EPLB algorithms, run from the installed engines in a
subprocess (``tests/engines.py``); skipped where an engine is not installed."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from moeplace.solvers.baselines import eplb
from tests.engines import engine_path, run_with_engine

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


def _engine_layouts(engine: str, code: str, tmp_path) -> list[np.ndarray]:
    engine_path(engine)
    cases = [{"load": _loads(i, N).tolist(), "G": G, "M": M, "R": R, "g": g}
             for i, (G, M, R, g, N) in enumerate(SETTINGS)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    r = run_with_engine(engine, f"import json\ncases = json.load(open({str(tmp_path / 'cases.json')!r}))\n"
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
    _compare(_engine_layouts("vllm", code, tmp_path))


SGLANG_BOOT = """
import importlib.abc, importlib.machinery, os, sys, types
import torch.utils._triton as _tt
# torch decides that there is no triton before the shim below exists (and loads the modules
# that would look again), so only SGLang's module-level `import triton` sees the shim: its
# kernels never run in these CPU-only checks. Never a real triton install.
assert not _tt.has_triton_package()
import torch._dynamo, torch._inductor.runtime.triton_compat  # noqa: F401,E401


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


def test_eplb_equals_sglang_auto_choice(tmp_path):
    # SGLang's `auto`: deepseek_hierarchical when groups divide over nodes, else deepseek
    # (always the global policy). vLLM passes groups=1 for models without groups, where
    # SGLang passes None; both then run the global policy on several nodes.
    code = SGLANG_BOOT + """
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
    _compare(_engine_layouts("sglang", code, tmp_path))
