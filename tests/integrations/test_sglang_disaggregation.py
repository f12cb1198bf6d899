"""The launch lines ``export --prefill --decode`` prints, run through SGLang 0.5.23's own argument
parsing, resolution, checks and expert-location loader (as tests/integrations/
test_engine_oracle.py does for the single-instance line): each instance takes its own file, its
own disaggregation mode and a DeepEP mode that, by SGLang's own ``DeepEPMode.resolve``, runs the
kernel moeplace solved that phase for (prefill batches: normal, decode batches: low_latency).
Skips cleanly when SGLang is not installed (.ci/run installs it)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

from moeplace.placement import Placement
from moeplace.placement.exports import PD_KERNEL, SGLANG_DEEPEP_MODE, export_disaggregated
from tests.engines import engine_path, run_with_engine
from tests.integrations.test_engine_oracle import (
    SGLANG_BOOT,
    SGLANG_RANK_MAPS,
    SGLANG_RESOLVE_STUBS,
    dsv3_model_dir,
    dsv3_placement,
)


def _placement(G: int, M: int, R: int, seed: int) -> Placement:
    plc = dsv3_placement(G, M, R, seed)
    plc.info.update(model="deepseek-v3")
    return plc


def test_sglang_accepts_both_instances_and_runs_each_phases_kernel(tmp_path):
    from moeplace.models import known_layout

    pytest.importorskip("torch")
    engine_path("sglang")
    model = dsv3_model_dir(tmp_path)
    # Separate instances, different sizes: prefill 32 GPUs in 4 nodes with 32 redundant
    # experts, decode 16 GPUs in 2 nodes with none.
    pre, dec = _placement(32, 4, 32, 1), _placement(16, 2, 0, 2)
    pre.info.update(phase="prefill", dispatch="deepep-normal")
    dec.info.update(phase="decode", dispatch="deepep-ll")
    text = export_disaggregated(pre, dec, tmp_path / "pd", layout=known_layout("deepseek-v3"))
    cases = []
    for role, plc in (("prefill", pre), ("decode", dec)):
        line = next(x for x in text.splitlines() if x.startswith(f"SGLang {role}: "))
        argv = shlex.split(line.split("sglang.launch_server", 1)[1])
        argv[argv.index("--model-path") + 1] = str(model)
        for node in (0, plc.num_nodes - 1):
            a = list(argv)
            a[a.index("--node-rank") + 1] = str(node)
            per = plc.num_gpus // plc.num_nodes
            cases.append({"role": role, "argv": [*a, "--device", "cpu"],
                          "ranks": [node * per, node * per + per - 1]})
    # A control: SGLang's parser refuses a DeepEP mode it does not have (so its acceptance of
    # the lines above means something).
    bad = [*cases[0]["argv"]]
    bad[bad.index("--deepep-mode") + 1] = "lowlatency"
    cases.append({"role": "control", "argv": bad, "ranks": []})
    boot = SGLANG_BOOT.replace('name.split(".")[0] == "triton"',
                               f'name.split(".")[0] in {("triton", *SGLANG_RESOLVE_STUBS)!r}')
    code = boot + SGLANG_RANK_MAPS + """
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.layers.moe.utils import DeepEPMode

out = []
for c in json.load(open(CASES)):
    try:
        sa = prepare_server_args(c["argv"])
        sa.resolve_once()
        sa.check_server_args()
        v = resolved_view(sa)
        mode = DeepEPMode(v.deepep_mode)
        res = {"disaggregation_mode": v.disaggregation_mode,
               "moe_a2a_backend": v.moe_a2a_backend, "ep_size": v.ep_size,
               "init_expert_location": v.init_expert_location,
               "redundant": v.ep_num_redundant_experts,
               "prefill_batch": mode.resolve(is_extend_in_batch=True).value,
               "decode_batch": mode.resolve(is_extend_in_batch=False).value}
        res["maps"] = rank_maps(sa, c["ranks"])
        out.append({"ok": res})
    except BaseException as e:  # the engine's refusal (argparse exits) is the answer
        out.append({"error": type(e).__name__, "why": str(e).splitlines()[0] if str(e) else ""})
print(json.dumps(out))
"""
    # One process per instance, as SGLang runs them: its parallel state is set once a process.
    res = []
    for role in ("prefill", "decode", "control"):
        mine = tmp_path / f"{role}.json"
        mine.write_text(json.dumps([c for c in cases if c["role"] == role]))
        r = run_with_engine("sglang", f"CASES = {str(mine)!r}\n" + code, timeout=900)
        if r.returncode and "ModuleNotFoundError" in r.stderr:
            pytest.skip("SGLang's server arguments do not import: "
                        + r.stderr.strip().splitlines()[-1])
        assert r.returncode == 0, r.stderr[-3000:]
        res += json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == len(cases)
    *good, control = res
    assert control["error"] == "SystemExit", control
    mode_of = {v: k for k, v in SGLANG_DEEPEP_MODE.items()}
    for c, got in zip(cases[:-1], good, strict=True):
        role = c["role"]
        assert "ok" in got, (role, got)
        g = got["ok"]
        plc = pre if role == "prefill" else dec
        assert g["disaggregation_mode"] == role and g["moe_a2a_backend"] == "deepep"
        assert g["init_expert_location"] == str(tmp_path / "pd" / f"{role}.json")
        assert g["ep_size"] == plc.num_gpus and g["redundant"] == plc.num_replicas
        # the batches this instance runs use the kernel moeplace solved the phase for
        ran = g["prefill_batch"] if role == "prefill" else g["decode_batch"]
        assert mode_of[ran] == PD_KERNEL[role] == plc.info["dispatch"]
        assert len(g["maps"]) == 2
        for ep, rows in g["maps"]:
            rows = np.array(rows)
            assert ep == plc.num_gpus and rows.shape == (61, plc.num_slots)
            assert (rows[3:] == plc.phy2log).all()  # each instance loads its own placement
            assert (rows[:3] == np.arange(plc.num_slots) % 256).all()
