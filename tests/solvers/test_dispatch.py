"""Dispatch kernels' counting rules against a per-token recount, and the fitted profile against
DeepEP's published V1 figures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.solvers.dispatch import KERNELS, simulate, volumes
from moeplace.solvers.simulator import Hardware


def brute(gpus, home, G, n, kernel):
    """Per token, the copies a kernel sends: (nvlink, network) by the rules as DeepEP states
    them, written as plain loops."""
    out = []
    for row, h in zip(gpus.tolist(), home.tolist(), strict=False):
        sel = [g for g in row if g >= 0]
        if kernel == "deepep-ll":
            nv = sum(1 for g in sel if g != h and g // n == h // n)
            net = sum(1 for g in sel if g // n != h // n)
        elif kernel == "alltoall" or G == n:
            ranks = set(sel) - {h}
            nv = sum(1 for g in ranks if g // n == h // n)
            net = len(ranks) - nv
        else:  # normal / v2: RDMA per remote node, NVLink from each node's entry rank
            nodes = {g // n for g in sel}
            net = len(nodes - {h // n})
            nv = sum(1 for g in set(sel) if g != (g // n) * n + h % n)
        out.append((nv, net))
    return np.array(out).reshape(-1, 2)


@st.composite
def routing(draw):
    n = draw(st.sampled_from([1, 2, 4]))
    M = draw(st.integers(1, 4))
    G = n * M
    T = draw(st.integers(1, 12))
    k = draw(st.integers(1, 5))
    gpus = np.array(draw(st.lists(st.lists(st.integers(-1, G - 1), min_size=k, max_size=k),
                                  min_size=T, max_size=T)))
    home = np.array(draw(st.lists(st.integers(0, G - 1), min_size=T, max_size=T)))
    return gpus, home, G, n


@settings(max_examples=150, deadline=None)
@given(routing(), st.sampled_from(KERNELS))
def test_counts_match_brute_force(r, kernel):
    gpus, home, G, n = r
    v = volumes(gpus, home, G, n, kernel)
    b = brute(gpus, home, G, n, kernel)
    assert np.array_equal(v.nvl_copies, b[:, 0])
    assert np.array_equal(v.net_copies, b[:, 1])
    # every copy sent is received once
    assert v.nvl_send.sum() == v.nvl_recv.sum() == b[:, 0].sum()
    assert v.net_send.sum() == v.net_recv.sum() == b[:, 1].sum()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([(8, 2), (16, 8), (8, 8)]))
def test_ll_colocation_never_lowers_priced_traffic(seed, shape):
    """Under deepep-ll, moving a token's co-activated expert onto the remote rank of its
    partner never lowers the copies, nor the priced time of the slowest rank's traffic sum."""
    G, n = shape
    rng = np.random.default_rng(seed)
    T, k = 64, 4
    gpus = np.stack([rng.choice(G, k, replace=True) for _ in range(T)])
    home = rng.integers(0, G, T)
    # co-locate: selection 1 moves to the rank of selection 0 wherever that rank is remote
    moved = gpus.copy()
    remote = (gpus[:, 0] != home) & (gpus[:, 1] != home)
    moved[remote, 1] = gpus[remote, 0]
    a = volumes(gpus, home, G, n, "deepep-ll")
    b = volumes(moved, home, G, n, "deepep-ll")
    assert (b.nvl_copies + b.net_copies >= a.nvl_copies + a.net_copies).all()
    # a dedup kernel does gain from it (so the property is not vacuous)
    c = volumes(gpus, home, G, n, "alltoall")
    d = volumes(moved, home, G, n, "alltoall")
    assert (d.nvl_copies + d.net_copies <= c.nvl_copies + c.net_copies).all()


LL = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369),
      256: (194, 360)}
NORMAL = {8: (153, 158), 16: (43, 43), 32: (58, 57), 64: (51, 50)}


@pytest.mark.parametrize("ep", sorted(LL))
def test_ll_latency_within_20pct_of_deepep(ep):
    r = simulate("deepep-ll", ep, 128, 7168, 8, Hardware.load("h800-ib"))
    d, c = LL[ep]
    assert abs(r["dispatch_us"] / d - 1) < 0.2
    assert abs(r["combine_us"] / c - 1) < 0.2


@pytest.mark.parametrize("ep", sorted(NORMAL))
def test_normal_bandwidth_within_20pct_of_deepep(ep):
    r = simulate("deepep-normal", ep, 4096, 7168, 8, Hardware.load("h800-ib"))
    d, c = NORMAL[ep]
    assert abs(r["dispatch_bandwidth_gbps"] / d - 1) < 0.2
    assert abs(r["combine_bandwidth_gbps"] / c - 1) < 0.2


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moeplace.cli", "simulate", *args],
                          capture_output=True, text=True)


def test_cli_json_fields():
    p = _cli("--hardware", "h800-ib", "--kernel", "deepep-ll", "--ep", "16", "--tokens", "128",
             "--hidden", "7168", "--top-k", "8", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("dispatch_us", "combine_us", "dispatch_bandwidth_gbps", "combine_bandwidth_gbps"):
        assert r[key] > 0
    assert abs(r["dispatch_us"] / 118 - 1) < 0.2


@pytest.mark.parametrize("args", [["--ep", "12"], ["--kernel", "nope"], ["--ep", "0"],
                                  ["--hardware", "missing-profile"],
                                  ["--experts", "100", "--ep", "16"]])
def test_cli_bad_input_one_line(args):
    p = _cli(*args)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplace: error:")


def test_solve_phase_picks_kernel(tmp_path):
    """solve --phase decode runs deepep-ll (and says co-location does not pay), prefill
    deepep-normal; --dispatch overrides."""
    from click.testing import CliRunner

    from moeplace.cli import main

    tr = str(tmp_path / "t.parquet")  # both phases: each request's first 32 tokens prefill
    r = CliRunner().invoke(main, ["synth", "--preset", "flame-moe-290m", "--tokens", "1500",
                                  "--prompt-tokens", "32", "--out", tr])
    assert r.exit_code == 0
    for args, want in ((["--phase", "decode", "--tokens-per-step", "16"], "deepep-ll"),
                       (["--phase", "prefill"], "deepep-normal"),
                       (["--phase", "decode", "--dispatch", "deepep-normal"], "deepep-normal")):
        r = CliRunner().invoke(main, ["solve", tr, "--gpus", "4", "--nodes", "2", "--time-limit",
                                      "3", "--json", *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        out = r.stdout
        assert json.loads(out[out.index("{"):])["dispatch"] == want
        assert ("co-locating experts does not pay" in r.output) == (want == "deepep-ll")


def test_decode_solve_keeps_eplb_balance(tmp_path):
    """Under deepep-ll co-location buys nothing, so a decode solve must not give up token
    balance: where every expert is active in every step (8 experts, big steps), balancing active
    experts alone says nothing, and the placement must still be as balanced as EPLB's."""
    from click.testing import CliRunner

    from moeplace.cli import main

    rng = np.random.default_rng(7)
    T, L, N = 3000, 4, 8
    p = rng.dirichlet(np.full(N, 0.7), size=L)  # skewed, different per layer
    e = np.stack([np.stack([rng.choice(N, 2, replace=False, p=p[l]) for l in range(L)])
                  for _ in range(T)]).astype(np.int64)
    from moeplace.traces import Trace, TraceMeta
    from moeplace.traces.store import write_trace

    tr = tmp_path / "t.parquet"
    write_trace(Trace(e, TraceMeta(num_experts=N, top_k=2, moe_layer_ids=tuple(range(L)),
                                   model="skewed")), tr)
    r = CliRunner().invoke(main, ["solve", str(tr), "--gpus", "4", "--phase", "decode",
                                  "--time-limit", "600", "--out", str(tmp_path / "p.json"),
                                  "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = r.stdout
    d = json.loads(out[out.index("{"):])
    assert d["dispatch"] == "deepep-ll"
    rows = {row["placement"]: row for row in d["fit"]}
    assert rows["search"]["load_imbalance_mean"] <= rows["eplb"]["load_imbalance_mean"] + 1e-9


def test_ll_note_not_printed_before_bad_input(tmp_path):
    """Bad input stays one stderr line under --phase decode (the kernel note comes after the
    input is read)."""
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    p = subprocess.run([sys.executable, "-m", "moeplace", "solve", str(bad), "--gpus", "4",
                        "--phase", "decode", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplace: error:"), p.stderr


def test_step_time_prices_communication_by_the_kernel():
    """With a kernel, the simulator's communication per layer is that kernel's priced dispatch
    plus combine of the slowest rank: recomputed here from the brute-force counts and the
    profile's fitted parameters, on a tiny two-node placement."""
    from moeplace.placement import Placement
    from moeplace.solvers.dispatch import bytes_per_token, kernel_params
    from moeplace.solvers.simulator import Hardware, ModelShape, step_time
    from moeplace.traces import Trace, TraceMeta

    rng = np.random.default_rng(3)
    G, n, N, k, T = 4, 2, 8, 2, 64
    e = np.argsort(rng.random((T, 1, N)), axis=2)[:, :, :k]
    tr = Trace(e, TraceMeta(num_experts=N, top_k=k, moe_layer_ids=(0,), model="x"))
    plc = Placement(np.array([[3, 0, 5, 1, 2, 7, 6, 4]]), G, 2, N)
    hw, shape = Hardware.load("h800-ib"), ModelShape.named("deepseek-v3")
    gpu_of = plc.expert_gpu()[0]
    home = np.arange(T) % G  # no request ids: each token its own request, round-robin homes
    for kernel in ("deepep-ll", "deepep-normal", "alltoall"):
        r = step_time(tr, plc, hw, shape, T, kernel=kernel)
        counts = brute(gpu_of[e[:, 0]], home, G, n, kernel)
        nvl, net = counts[:, 0], counts[:, 1]
        # per-rank send and receive counts from the per-token brute force (one layer, one step)
        want_d = want_c = 0.0
        sends = np.zeros((2, G))
        recvs = np.zeros((2, G))
        for t in range(T):
            h = home[t]
            sel = sorted(set(gpu_of[e[t, 0]].tolist())) if kernel != "deepep-ll" else \
                gpu_of[e[t, 0]].tolist()
            for g in sel:
                if g == h:
                    continue
                if g // n == h // n:
                    sends[0, h] += 1
                    recvs[0, g] += 1
                elif kernel == "deepep-normal":
                    continue  # counted below per remote node
                else:
                    sends[1, h] += 1
                    recvs[1, g] += 1
            if kernel == "deepep-normal":
                for node in sorted({g // n for g in sel} - {h // n}):
                    entry = node * n + h % n
                    sends[1, h] += 1
                    recvs[1, entry] += 1
                    for g in sel:
                        if g // n == node and g != entry:
                            sends[0, entry] += 1
                            recvs[0, g] += 1
        assert sends.sum(axis=1)[0] == nvl.sum() and sends.sum(axis=1)[1] == net.sum()
        for stage in ("dispatch", "combine"):
            p = kernel_params(hw, kernel, stage)
            b = bytes_per_token(kernel, shape.hidden_size, stage) / 1e9
            v_nv = np.maximum(sends[0], recvs[0]) * b
            v_net = np.maximum(sends[1], recvs[1]) * b
            a = p["alpha_us"] * 1e-6
            if kernel == "deepep-ll":
                t = a + v_nv / p["intra_gbps"] + v_net / p["inter_gbps"] + p["beta_us"] * 1e-6
            elif kernel == "alltoall":
                t = a + v_nv / p["nvlink_gbps"] + v_net / p["rdma_gbps"]
            else:
                t = a + np.maximum(v_nv / p["nvlink_gbps"], v_net / p["rdma_gbps"])
            if stage == "dispatch":
                want_d = t.max()
            else:
                want_c = t.max()
        assert r["dispatch_s"] == pytest.approx(want_d, rel=1e-9)
        assert r["combine_s"] == pytest.approx(want_c, rel=1e-9)


def test_evaluate_dispatch_reports_priced_step(tmp_path):
    """evaluate --dispatch adds the kernel's priced step; deepep-ll pays for every remote
    selection, so it is never cheaper in copies than deepep-normal on the same placement."""
    from click.testing import CliRunner

    from moeplace.cli import main
    from moeplace.traces.demo import demo_trace_path

    tr = str(demo_trace_path())
    plc = str(tmp_path / "p.json")
    r = CliRunner().invoke(main, ["solve", tr, "--gpus", "8", "--nodes", "2", "--method",
                                  "contiguous", "--out", plc, "--time-limit", "600"])
    assert r.exit_code == 0, r.output
    got = {}
    for kernel in ("deepep-normal", "deepep-ll"):
        r = CliRunner().invoke(main, ["evaluate", tr, plc, "--dispatch", kernel, "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["dispatch"] == kernel and d["hardware"] == "h800-ib"
        assert d["dispatch_us"] > 0 and d["combine_us"] > 0 and d["step_ms"] > 0
        got[kernel] = d
    r = CliRunner().invoke(main, ["evaluate", tr, plc, "--dispatch", "deepep-ll",
                                  "--hardware", str(tmp_path / "missing.json")])
    assert r.exit_code == 2
