"""``export`` refuses a placement for another deployment than the one asked for (SGLang 0.5.23
loads such files silently), in one line with exit 2 and nothing written; the launch line it
prints is complete for the deployment (SGLang's own parsing checks it in
tests/integrations/test_engine_oracle.py)."""

from __future__ import annotations

import shlex

import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.errors import InputError
from moeplace.placement import contiguous
from moeplace.placement.exports import check_deployment, export_placement, sglang_launch_line

DSV3_IDS = tuple(range(3, 61))


@pytest.fixture
def dsv3(tmp_path):
    """DeepSeek-V3's 58 MoE layers, 256 experts + 32 replicas on 32 GPUs in 4 nodes."""
    p = tmp_path / "p.json"
    contiguous(58, 256, 32, replicas=32, num_nodes=4, moe_layer_ids=DSV3_IDS).save(p)
    return p


@pytest.mark.parametrize("args, field", [
    (["--replicas", "0"], "num_replicas"),      # 288 slots under --ep-num-redundant-experts 0
    (["--gpus", "16"], "num_gpus"),             # a 32-GPU file under --ep-size 16
    (["--nodes", "2"], "num_nodes"),
    (["--model-shape", "deepseek-v2"], "moe_layer_ids"),  # layer 60: V2 has 60 layers
    (["--num-hidden-layers", "40"], "value"),   # layer 60 beyond the config's layers
])
def test_mismatch_refused_in_one_line(dsv3, tmp_path, args, field):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["export", str(dsv3), "--format", "sglang", "--out", str(out),
                                  *args])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("moeplace: error: ") and f": {field}: " in lines[0]
    assert not out.exists()


def test_matching_deployment_prints_complete_line(dsv3, tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["export", str(dsv3), "--format", "sglang", "--out", str(out),
                                  "--model-shape", "deepseek-v3", "--gpus", "32", "--nodes", "4",
                                  "--replicas", "32"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "sglang.launch_server" in x)
    argv = shlex.split(line.split("SGLang: ", 1)[1])
    flag = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert flag["--tp-size"] == flag["--ep-size"] == "32" and flag["--nnodes"] == "4"
    assert flag["--node-rank"] == "0" and flag["--ep-num-redundant-experts"] == "32"
    assert flag["--init-expert-location"] == str(out)
    assert "--node-rank r, r = 0..3" in r.output


def test_single_node_line_and_library_check(tmp_path):
    plc = contiguous(2, 8, 4, moe_layer_ids=(0, 1))
    line = sglang_launch_line(plc, "a b.json")
    assert "--nnodes" not in line and "'a b.json'" in line and "redundant" not in line
    check_deployment(plc, num_gpus=4, num_nodes=1, replicas=0)
    with pytest.raises(InputError, match="placed for 4 GPUs"):
        export_placement(plc, "eplb", tmp_path / "e.npz", num_gpus=8)
    assert not (tmp_path / "e.npz").exists()
