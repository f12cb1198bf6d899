"""What each dispatch kernel pays for a token's experts, and its time from a fitted profile.

Counting rules (one token at home rank ``h`` of ``G`` ranks, ``n`` per node; its selected
experts served on ranks ``g_1..g_k``), after DeepEP's own code and tests:

- ``alltoall`` (the plain all-to-all engines fall back on): one copy per distinct remote rank,
  over NVLink inside the node and over the network across nodes.
- ``deepep-normal`` (V1 normal kernels, prefill): inside one node, one NVLink copy per distinct
  remote rank; across nodes one RDMA copy per distinct remote node (to the rank with the same
  local index there), then one NVLink copy from that entry rank to every other distinct rank of
  that node (tests/test_internode.py counts ``rdma_idx`` distinct nodes, ``recv_x`` per rank).
- ``deepep-ll`` (V1 low-latency kernels, decode): one put per (token, selected expert) whose
  rank is not the home rank; two experts on one remote rank cost two copies
  (tests/test_low_latency.py counts ``num_selections`` per token). Co-location buys nothing.
- ``deepep-v2`` (``ElasticBuffer``, hybrid mode): deduplicated per rank, RDMA per distinct
  node: counted as ``deepep-normal``.

Time of one rank (``price``): with a profile's fitted ``kernels`` entry, normal kernels take
``alpha + max(nvlink_bytes / B_nvlink, rdma_bytes / B_rdma)`` (the two domains pipeline) and the
low-latency kernels ``alpha + intra_bytes / B_intra + inter_bytes / B_inter + beta * log2(nodes)``
(bytes: the larger of sent and received); fitted by benchmarks/fit_deepep.py to DeepEP's
published V1 tables. Without a fitted entry the profile's link figures give the same forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeplace.errors import InputError

KERNELS = ("alltoall", "deepep-normal", "deepep-ll", "deepep-v2")
# SGLang's --deepep-mode auto: normal kernels for prefill, low-latency for decode.
PHASE_KERNEL = {"prefill": "deepep-normal", "decode": "deepep-ll"}


def check_kernel(kernel: str, field: str = "--kernel") -> str:
    """The kernel name, or one ``InputError``."""
    if kernel not in KERNELS:
        raise InputError("dispatch", field, f"unknown kernel {kernel!r}",
                         f"use one of {', '.join(KERNELS)}")
    return kernel


def default_kernel(engine: str, phase: str) -> str:
    """The kernel an engine runs in a phase: ``exflow`` the plain all-to-all, the DeepEP
    engines the phase's kernel (SGLang ``--deepep-mode auto``)."""
    if engine == "exflow":
        return "alltoall"
    return PHASE_KERNEL.get(phase, "deepep-normal")


def bytes_per_token(kernel: str, hidden: int, stage: str) -> float:
    """Bytes of one token copy: FP8 dispatch (1 byte per element plus one 4-byte scale per 128;
    the low-latency kernels add 16 bytes of metadata, tests/test_low_latency.py
    ``num_fp8_bytes``), BF16 combine (2 bytes per element)."""
    if stage == "combine":
        return 2.0 * hidden
    extra = 16.0 if kernel == "deepep-ll" else 0.0
    return hidden * (1 + 4 / 128) + extra


@dataclass
class Volumes:
    """Per-rank copies (tokens) of one dispatch: ``nvl_send/nvl_recv/net_send/net_recv [G]``,
    the per-token copies ``nvl_copies/net_copies [T]``, and DeepEP's logical counts for its
    bandwidth figures: ``logical_net [G]`` (distinct nodes per token sent, own node included),
    ``logical_nvl [G]`` (tokens received per rank), ``selections [G]`` (selections sent)."""

    nvl_send: np.ndarray
    nvl_recv: np.ndarray
    net_send: np.ndarray
    net_recv: np.ndarray
    nvl_copies: np.ndarray
    net_copies: np.ndarray
    logical_net: np.ndarray
    logical_nvl: np.ndarray
    selections: np.ndarray


def _first(sorted_rows: np.ndarray) -> np.ndarray:
    f = np.ones_like(sorted_rows, bool)
    f[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    return f & (sorted_rows >= 0)


def volumes(gpus: np.ndarray, home: np.ndarray, num_gpus: int, gpus_per_node: int,
            kernel: str) -> Volumes:
    """Count one dispatch by ``kernel``'s rule. ``gpus [T, k]``: rank serving each selection
    (-1: masked); ``home [T]``: each token's rank. Combine sends the same copies back."""
    check_kernel(kernel)
    g = np.asarray(gpus, np.int64)
    h = np.asarray(home, np.int64)
    G, n = int(num_gpus), int(gpus_per_node)
    T = g.shape[0]
    M = G // n
    node = np.where(g >= 0, g // n, -1)
    hn = h // n
    srt = np.sort(g, axis=1)
    first = _first(srt)
    zero = np.zeros(G, np.int64)

    def bc(x: np.ndarray) -> np.ndarray:
        return np.bincount(x, minlength=G).astype(np.int64) if x.size else zero.copy()

    nsrt = np.sort(node, axis=1)
    nfirst = _first(nsrt)
    logical_net = bc(np.repeat(h, nfirst.sum(axis=1)))
    valid = g >= 0
    selections = bc(np.repeat(h, valid.sum(axis=1)))
    logical_nvl = bc(srt[first])
    if kernel == "deepep-ll":
        remote = valid & (g != h[:, None])
        same = remote & (node == hn[:, None])
        cross = remote & ~same
        nvl_c, net_c = same.sum(axis=1), cross.sum(axis=1)
        return Volumes(bc(np.repeat(h, nvl_c)), bc(g[same]), bc(np.repeat(h, net_c)), bc(g[cross]),
                       nvl_c, net_c, logical_net, logical_nvl, selections)
    dst = srt[first]
    src = np.repeat(h, first.sum(axis=1))
    tok = np.repeat(np.arange(T), first.sum(axis=1))
    if kernel == "alltoall" or M == 1:
        rem = dst != src
        same = rem & (dst // n == src // n)
        cross = rem & ~same
        nvl_c = np.bincount(tok[same], minlength=T)
        net_c = np.bincount(tok[cross], minlength=T)
        return Volumes(bc(src[same]), bc(dst[same]), bc(src[cross]), bc(dst[cross]),
                       nvl_c, net_c, logical_net, logical_nvl, selections)
    # deepep-normal / deepep-v2 across nodes: RDMA to the entry rank of each remote node, then
    # NVLink from the entry rank to the other destination ranks of that node.
    entry = (dst // n) * n + src % n
    rdma_dst = nsrt[nfirst]
    rdma_src = np.repeat(h, nfirst.sum(axis=1))
    rdma_tok = np.repeat(np.arange(T), nfirst.sum(axis=1))
    rr = rdma_dst != rdma_src // n
    net_entry = rdma_dst[rr] * n + rdma_src[rr] % n
    fw = dst != entry
    nvl_c = np.bincount(tok[fw], minlength=T)
    net_c = np.bincount(rdma_tok[rr], minlength=T)
    return Volumes(bc(entry[fw]), bc(dst[fw]), bc(rdma_src[rr]), bc(net_entry), nvl_c, net_c,
                   logical_net, logical_nvl, selections)


def kernel_params(hw: Any, kernel: str, stage: str) -> dict[str, float]:
    """The fitted parameters of ``kernel``'s ``stage`` in ``hw`` (``kernels`` entry; V2 falls
    back on the normal kernels' fit), else the profile's link figures in the same form."""
    fits = getattr(hw, "kernels", None) or {}
    key = kernel if kernel in fits else ("deepep-normal" if kernel == "deepep-v2"
                                         and "deepep-normal" in fits else None)
    if key is not None:
        return dict(fits[key][stage])
    nv = hw.nvlink_bytes_per_s / 1e9
    net = hw.network_bytes_per_s * hw.network_efficiency / 1e9
    if kernel == "deepep-ll":
        return {"alpha_us": hw.network_alpha_s * 1e6, "intra_gbps": nv, "inter_gbps": net,
                "beta_us": 0.0}
    return {"alpha_us": max(hw.nvlink_alpha_s, hw.network_alpha_s) * 1e6, "nvlink_gbps": nv,
            "rdma_gbps": net}


def price(vol: Volumes, kernel: str, hw: Any, hidden: int, stage: str, num_nodes: int
          ) -> np.ndarray:
    """``[G]`` seconds each rank spends in one dispatch (``stage="dispatch"``) or combine."""
    p = kernel_params(hw, kernel, stage)
    b = bytes_per_token(kernel, hidden, stage)
    nvl = np.maximum(vol.nvl_send, vol.nvl_recv) * b / 1e9
    net = np.maximum(vol.net_send, vol.net_recv) * b / 1e9
    a = p["alpha_us"] * 1e-6
    if kernel == "deepep-ll":
        return (a + nvl / p["intra_gbps"] + net / p["inter_gbps"]
                + p["beta_us"] * 1e-6 * math.log2(max(num_nodes, 1)))
    if kernel == "alltoall":
        return a + nvl / p["nvlink_gbps"] + net / p["rdma_gbps"]
    return a + np.maximum(nvl / p["nvlink_gbps"], net / p["rdma_gbps"])


def uniform_routing(num_tokens: int, num_experts: int, top_k: int, num_nodes: int,
                    kernel: str, seed: int = 0) -> np.ndarray:
    """``[T, k]`` experts as DeepEP's tests draw them: scores ``|randn| + 1``, top-k; the
    normal-kernel tests first keep the top ``min(nodes, 4)`` nodes by their best score
    (group-limited routing, tests/test_internode.py)."""
    rng = np.random.default_rng(seed)
    s = np.abs(rng.standard_normal((num_tokens, num_experts), dtype=np.float32)) + 1
    if kernel != "deepep-ll" and num_nodes > 1:
        grp = s.reshape(num_tokens, num_nodes, -1)
        keep = min(num_nodes, 4)
        top = np.argsort(-grp.max(axis=2), axis=1)[:, :keep]
        mask = np.zeros((num_tokens, num_nodes), bool)
        np.put_along_axis(mask, top, True, axis=1)
        s = np.where(np.repeat(mask, num_experts // num_nodes, axis=1), s, 0.0)
    return np.argsort(-s, axis=1)[:, :top_k]


def simulate(kernel: str, ep: int, tokens: int, hidden: int, top_k: int, hw: Any, *,
             num_experts: int = 256, gpus_per_node: int = 8, seed: int = 0,
             experts: np.ndarray | None = None, expert_gpu: np.ndarray | None = None
             ) -> dict[str, Any]:
    """Price one dispatch and combine of ``tokens`` tokens per rank on ``ep`` ranks.

    Routing: ``experts [ep * tokens, k]`` (token t on rank ``t // tokens``) and ``expert_gpu
    [N]`` (a placement's layer), else DeepEP's uniform random routing with contiguous experts.
    ``dispatch_us`` is the mean over ranks (DeepEP's tests print per rank), ``*_max_us`` the
    slowest rank; bandwidths follow DeepEP's definitions: normal kernels' bottleneck bandwidth
    is RDMA bytes sent (distinct nodes, own node included) per rank over time across nodes and
    NVLink bytes received within one; the low-latency kernels' is all selections' bytes."""
    check_kernel(kernel)
    for name, v in (("--ep", ep), ("--tokens", tokens), ("--hidden", hidden),
                    ("--top-k", top_k), ("--experts", num_experts)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError("simulate", name, f"{v!r} is not an integer >= 1", "pass a positive integer")
    n = min(gpus_per_node, ep)
    if ep % n:
        raise InputError("simulate", "--ep", f"{ep} ranks do not fill nodes of {n}",
                         f"use a multiple of {n}")
    M = ep // n
    if experts is None:
        if num_experts % ep or top_k > num_experts:
            raise InputError("simulate", "--experts", f"{num_experts} experts do not split over "
                             f"{ep} ranks with top-{top_k}", "use a multiple of --ep >= --top-k")
        experts = uniform_routing(ep * tokens, num_experts, top_k, M, kernel, seed)
        expert_gpu = np.arange(num_experts) // (num_experts // ep)
    assert expert_gpu is not None
    gpus = np.where(experts >= 0, np.asarray(expert_gpu)[np.maximum(experts, 0)], -1)
    home = np.arange(gpus.shape[0]) // tokens
    vol = volumes(gpus, home, ep, n, kernel)
    out: dict[str, Any] = {"kernel": kernel, "hardware": getattr(hw, "name", "?"), "ep": ep,
                           "nodes": M, "tokens": tokens, "hidden": hidden, "top_k": top_k}
    for stage in ("dispatch", "combine"):
        t = price(vol, kernel, hw, hidden, stage, M)
        b = bytes_per_token(kernel, hidden, stage)
        if kernel == "deepep-ll":
            logical = vol.selections
        else:
            logical = vol.logical_net if M > 1 else vol.logical_nvl
        out[f"{stage}_us"] = float(t.mean() * 1e6)
        out[f"{stage}_max_us"] = float(t.max() * 1e6)
        out[f"{stage}_bandwidth_gbps"] = float((logical * b / t).mean() / 1e9)
    fits = getattr(hw, "kernels", None) or {}
    out["profile_fit"] = fits.get("_fit", "not fitted to measurements: the profile's link "
                                  "figures (datasheet rates and assumed latencies)")
    out["nvlink_copies_per_token"] = float(vol.nvl_copies.mean())
    out["rdma_copies_per_token"] = float(vol.net_copies.mean())
    return out
