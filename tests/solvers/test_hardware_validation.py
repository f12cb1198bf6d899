"""User hardware profiles (`solve --hardware FILE.json`): every rate checked before use."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from moeplace.solvers.simulator import Hardware
from tests.bad_input import raises_input


def _good() -> dict:
    return json.loads((resources.files("moeplace") / "data/hardware/h100-nvlink.json").read_text())


def _with(**kw):
    d = _good()
    d.update(kw)
    return json.dumps(d)


CASES = [
    ("list", "[1]", "not a JSON object"),
    ("deep", "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("NaN rate", _with(bf16_flops=float("nan")), "not finite"),
    ("inf rate", _with(hbm_bytes_per_s=float("inf")), "not finite"),
    ("string rate", _with(nvlink_bytes_per_s="fast"), "is not a number"),
    ("bool rate", _with(matmul_efficiency=True), "is not a number"),
    ("zero rate", _with(network_bytes_per_s=0), "is zero"),
    ("negative latency", _with(nvlink_alpha_s=-1e-6), "is negative"),
    ("name number", _with(name=5), "is not a string"),
    ("missing key", json.dumps({k: v for k, v in _good().items() if k != "bf16_flops"}),
     "missing"),
]


@pytest.mark.parametrize("name,text,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_hardware_profile(tmp_path, name, text, needle):
    (tmp_path / "hw.json").write_text(text)
    raises_input(lambda: Hardware.load(str(tmp_path / "hw.json")), needle)


def test_zero_latency_is_allowed(tmp_path):
    (tmp_path / "hw.json").write_text(_with(nvlink_alpha_s=0))
    assert Hardware.load(str(tmp_path / "hw.json")).nvlink_alpha_s == 0


@pytest.mark.parametrize("speeds, needle", [
    ("1,1", "not a non-empty list"), ([], "not a non-empty list"), ([1, 0], "finite number > 0"),
    ([1, "x"], "is not a number"), ([1, True], "is not a number"), ([1, -1], "finite number > 0")])
def test_bad_gpu_speeds_field(tmp_path, speeds, needle):
    (tmp_path / "hw.json").write_text(_with(gpu_speeds=speeds))
    raises_input(lambda: Hardware.load(str(tmp_path / "hw.json")), needle)


def test_gpu_speeds_slow_down_the_slow_gpus(tmp_path):
    """Halving every GPU's speed doubles the compute part; a speed list of the wrong length
    names the file and the field."""
    import numpy as np

    from moeplace.placement import contiguous
    from moeplace.solvers.simulator import ModelShape, step_time
    from tests.conftest import random_trace

    tr = random_trace(np.random.default_rng(0), 256, 2, 16, 2, requests=4)
    p = contiguous(2, 16, 4)
    shape = ModelShape.named("deepseek-v2-lite")
    base = step_time(tr, p, Hardware.load("h100-nvlink"), shape, 64)
    (tmp_path / "hw.json").write_text(_with(gpu_speeds=[0.5] * 4))
    hw = Hardware.load(str(tmp_path / "hw.json"))
    slow = step_time(tr, p, hw, shape, 64)
    assert slow["compute_s"] == pytest.approx(2 * base["compute_s"])
    assert step_time(tr, p, hw, shape, 64, gpu_speeds=[1, 1, 1, 1]) == base
    (tmp_path / "hw.json").write_text(_with(gpu_speeds=[1, 1]))
    hw2 = Hardware.load(str(tmp_path / "hw.json"))
    raises_input(lambda: step_time(tr, p, hw2, shape, 64), "2 speeds for 4 GPUs")
