"""``export --prefill P --decode D --format sglang --out-dir DIR``: both instances of a
prefill-decode disaggregated SGLang deployment, each file SGLang's map of its own placement and
each launch line with its own file, disaggregation mode and DeepEP mode; a pair that cannot
serve one model, a placement solved for the other phase or kernel, and a mixed-up request are
one error line with nothing written. SGLang 0.5.23's own argument parsing checks the lines in
tests/integrations/test_sglang_disaggregation.py."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.placement import Placement, contiguous
from moeplace.placement.exports import (
    PD_KERNEL,
    SGLANG_DEEPEP_MODE,
    check_disaggregated,
    export_disaggregated,
    read_placement,
)
from moeplace.solvers.dispatch import PHASE_KERNEL
from tests.bad_input import cli_fails, raises_input

IDS = (1, 2, 3)


def _plc(gpus: int, seed: int, replicas: int = 0, nodes: int = 1, phase: str | None = None,
         dispatch: str | None = None, experts: int = 8, ids: tuple[int, ...] = IDS) -> Placement:
    rng = np.random.default_rng(seed)
    P = experts + replicas
    phy = np.stack([np.concatenate([rng.permutation(experts),
                                    rng.choice(experts, replicas, replace=False)])
                    for _ in ids])
    plc = Placement(phy, gpus, nodes, experts, moe_layer_ids=ids, colocated=True)
    assert plc.num_slots == P
    if phase:
        plc.info["phase"] = phase
    if dispatch:
        plc.info["dispatch"] = dispatch
    return plc


def _argv(output: str, role: str) -> dict[str, str]:
    line = next(x for x in output.splitlines() if x.startswith(f"SGLang {role}: "))
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    return {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}


def test_kernels_are_solves():
    # The instance's kernel is the one solve --phase optimises for.
    assert PD_KERNEL == PHASE_KERNEL
    assert set(SGLANG_DEEPEP_MODE) == set(PD_KERNEL.values())


def test_cli_writes_both_placements_and_both_lines(tmp_path):
    pre = _plc(4, 1, replicas=4, phase="prefill", dispatch="deepep-normal")
    dec = _plc(8, 2, replicas=8, nodes=2, phase="decode", dispatch="deepep-ll")
    pre.save(tmp_path / "p.json")
    dec.save(tmp_path / "d.json")
    out = tmp_path / "pd"
    r = CliRunner().invoke(main, ["export", "--prefill", str(tmp_path / "p.json"), "--decode",
                                  str(tmp_path / "d.json"), "--format", "sglang",
                                  "--out-dir", str(out), "--num-hidden-layers", "5"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["decode.json", "prefill.json"]
    for name, plc in (("prefill", pre), ("decode", dec)):
        back = read_placement(out / f"{name}.json", "sglang", num_gpus=plc.num_gpus,
                              num_nodes=plc.num_nodes, moe_layer_ids=list(IDS))
        np.testing.assert_array_equal(back.phy2log, plc.phy2log)
        flag = _argv(r.stdout, name)
        assert flag["--init-expert-location"] == str(out / f"{name}.json")
        assert flag["--disaggregation-mode"] == name
        assert flag["--moe-a2a-backend"] == "deepep"
        assert flag["--deepep-mode"] == {"prefill": "normal", "decode": "low_latency"}[name]
        assert flag["--tp-size"] == flag["--ep-size"] == str(plc.num_gpus)
        assert flag["--ep-num-redundant-experts"] == str(plc.num_replicas)
    assert "--nnodes" not in _argv(r.stdout, "prefill")
    dflag = _argv(r.stdout, "decode")
    assert dflag["--nnodes"] == "2" and dflag["--dist-init-addr"] == "DECODE_MASTER_IP:5000"
    assert "sglang_router.launch_router --pd-disaggregation" in r.stdout


def test_library_accepts_unrecorded_placements_and_other_gpu_counts(tmp_path):
    text = export_disaggregated(_plc(2, 1), _plc(4, 2), tmp_path / "x")
    assert "--disaggregation-mode prefill" in text and "--deepep-mode low_latency" in text
    assert (tmp_path / "x" / "decode.json").exists()


@pytest.mark.parametrize("pre, dec, needle, field", [
    (_plc(4, 1), _plc(4, 2, experts=16), "num_experts: 16, but the prefill placement", "num_experts"),
    (_plc(4, 1), _plc(4, 2, ids=(1, 2)), "2, but the prefill placement", "num_layers"),
    (_plc(4, 1), _plc(4, 2, ids=(2, 3, 4)), "MoE layers differ", "moe_layer_ids"),
    (_plc(4, 1, phase="decode"), _plc(4, 2), "solved with --phase decode, given as --prefill",
     "phase"),
    (_plc(4, 1), _plc(4, 2, phase="prefill"), "given as --decode", "phase"),
    (_plc(4, 1), _plc(4, 2, dispatch="deepep-normal"), "runs deepep-ll (--deepep-mode "
     "low_latency)", "dispatch"),
    (_plc(4, 1, dispatch="deepep-v2"), _plc(4, 2), "solved for deepep-v2", "dispatch"),
])
def test_pair_refused(tmp_path, pre, dec, needle, field):
    raises_input(lambda: check_disaggregated(pre, dec), needle, field)
    raises_input(lambda: export_disaggregated(pre, dec, tmp_path / "x"), needle, field)
    assert not (tmp_path / "x").exists()


@pytest.fixture
def pair(tmp_path):
    _plc(4, 1, phase="prefill").save(tmp_path / "p.json")
    _plc(4, 2, phase="decode").save(tmp_path / "d.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    return tmp_path


@pytest.mark.parametrize("args, needle", [
    (["--prefill", "{d}/d.json", "--decode", "{d}/p.json", "--out-dir", "{d}/o"],
     "d.json: phase: solved with --phase decode, given as --prefill"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/d.json", "--out-dir", "{d}/o", "--gpus", "4"],
     "export: --gpus: names one deployment"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/d.json", "--out", "{d}/o.json"],
     "export: --out: given with --prefill"),
    (["{d}/p.json", "--prefill", "{d}/p.json", "--decode", "{d}/d.json", "--out-dir", "{d}/o"],
     "export: PLACEMENT: given with --prefill"),
    (["--prefill", "{d}/p.json", "--out-dir", "{d}/o"], "export: --decode: missing"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/d.json"], "export: --out-dir: missing"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/d.json", "--out-dir", "{d}/full"],
     "is a directory that is not empty"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/d.json", "--out-dir", "{d}"],
     "contains this command's input"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/d.json", "--out-dir", "{d}/p.json"],
     "is a file"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/nope.json", "--out-dir", "{d}/o"], "nope.json"),
    (["--prefill", "{d}/p.json", "--decode", "{d}/d.json", "--out-dir", "{d}/o",
      "--model-shape", "deepseek-v3"], "p.json"),
])
def test_cli_refusals_are_one_line_and_write_nothing(pair, args, needle):
    full = ["export", "--format", "sglang", *[a.replace("{d}", str(pair)) for a in args]]
    before = sorted(p.name for p in pair.rglob("*"))
    cli_fails(full, needle)
    assert sorted(p.name for p in pair.rglob("*")) == before


def test_cli_other_format_refused(pair):
    cli_fails(["export", "--format", "trtllm", "--prefill", pair / "p.json", "--decode",
               pair / "d.json", "--out-dir", pair / "o"], "--format: trtllm has no prefill-decode")
    assert not (pair / "o").exists()


def test_single_export_still_needs_its_arguments(tmp_path):
    contiguous(3, 8, 4, moe_layer_ids=IDS).save(tmp_path / "p.json")
    cli_fails(["export", "--format", "sglang", "--out", tmp_path / "o.json"],
              "export: PLACEMENT: missing")
    cli_fails(["export", tmp_path / "p.json", "--format", "sglang"], "export: --out: missing")
