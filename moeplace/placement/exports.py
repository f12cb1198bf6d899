"""Write placements in the files serving stacks load (SGLang, TensorRT-LLM, vLLM proposals,
vllm-ascend, EPLB) and read them back.

Layer axes differ by stack: SGLang counts every hidden layer (dense layers get trivial rows),
TensorRT-LLM keys its YAML by hidden-layer id, the vLLM proposals, vllm-ascend and EPLB count MoE
layers only. A placement knows its MoE layers' hidden-layer ids (``moe_layer_ids``) when it was
solved from a trace; otherwise they must be given. ``layout`` (``moeplace.models``: a model's
``config.json`` or a known model) makes the export refuse ids the model does not have.

Stacks load layouts with two copies of one expert on one GPU (DeepSeek's EPLB makes them), so
everything read back from a stack's file may hold them (``Placement.colocated``).
"""

from __future__ import annotations

import json
import os
import shlex
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moeplace._fileio import atomic_path
from moeplace._validate import loads_json, read_json
from moeplace.errors import InputError, MissingDependencyError
from moeplace.placement.placement import Placement

if TYPE_CHECKING:
    from moeplace.models import ModelLayout

MAX_PLACEMENT_BYTES = 256 << 20  # Kimi-K2 on 1024 slots x 61 layers is a few MB as text
FORMATS = ("sglang", "sglang-logical-count", "trtllm", "vllm-ascend", "vllm-pr49572",
           "vllm-pr41141", "eplb")


def _hidden_rows(placement: Placement, num_hidden_layers: int | None,
                 moe_layer_ids: list[int] | None) -> tuple[int, list[int]]:
    ids = list(moe_layer_ids) if moe_layer_ids is not None else (
        list(placement.moe_layer_ids) if placement.moe_layer_ids is not None else None)
    if ids is None:
        raise InputError(placement.source, "moe_layer_ids", "unknown: which hidden layers are MoE?",
                         "pass --moe-layers (or solve from a trace that records them)")
    if len(ids) != placement.num_layers:
        raise InputError(placement.source, "moe_layer_ids", f"{len(ids)} ids for "
                         f"{placement.num_layers} MoE layers", "give one id per MoE layer")
    H = num_hidden_layers if num_hidden_layers is not None else max(ids) + 1
    if max(ids) >= H or min(ids) < 0:
        raise InputError("--num-hidden-layers", "value", f"{H} hidden layers cannot hold MoE "
                         f"layer {max(ids)}", "pass the model's num_hidden_layers")
    return H, ids


def to_sglang(placement: Placement, num_hidden_layers: int | None = None,
              moe_layer_ids: list[int] | None = None) -> dict[str, Any]:
    """``{"physical_to_logical_map": [num_hidden_layers][N+R]}`` for ``--init-expert-location``."""
    H, ids = _hidden_rows(placement, num_hidden_layers, moe_layer_ids)
    trivial = (np.arange(placement.num_slots) % int(placement.num_experts)).tolist()  # type: ignore[arg-type]
    rows = [trivial] * H
    for j, h in enumerate(ids):
        rows[h] = placement.phy2log[j].tolist()
    return {"physical_to_logical_map": rows}


def to_sglang_logical_count(load: np.ndarray, moe_layer_ids: list[int],
                            num_hidden_layers: int | None = None) -> dict[str, Any]:
    """``{"logical_count": [num_hidden_layers][N]}`` so SGLang runs its own EPLB at start-up."""
    H = num_hidden_layers if num_hidden_layers is not None else max(moe_layer_ids) + 1
    out = np.zeros((H, load.shape[1]), np.int64)
    out[list(moe_layer_ids)] = load
    return {"logical_count": out.tolist()}


def to_eplb(placement: Placement) -> dict[str, np.ndarray]:
    """DeepSeek EPLB arrays: ``phy2log [L, P]``, ``log2phy [L, N, max copies]``, ``logcnt``."""
    return {"phy2log": placement.phy2log.astype(np.int64),
            "log2phy": placement.log2phy().astype(np.int64),
            "logcnt": placement.logcnt().astype(np.int64)}


def to_vllm_ascend(placement: Placement) -> dict[str, Any]:
    return {"moe_layer_count": placement.num_layers, "layer_list": [
        {"layer_id": l, "device_count": placement.num_gpus,
         "device_list": [{"device_id": g, "device_expert": ex}
                         for g, ex in enumerate(placement.gpu_experts(l))]}
        for l in range(placement.num_layers)]}


SGLANG_MASTER = "MASTER_IP:5000"  # the first node's address, replaced by the user

# Prefill-decode disaggregation (SGLang 0.5.23 ``--disaggregation-mode``): each phase runs on an
# instance of its own, with the DeepEP kernel of that phase, as SGLang's ``--deepep-mode auto``
# picks per batch (``DeepEPMode.resolve``: normal for extend batches, low_latency for decode).
# moeplace's kernel names as ``solvers.dispatch.PHASE_KERNEL`` (the test keeps the two equal).
PD_PHASES = ("prefill", "decode")
PD_KERNEL = {"prefill": "deepep-normal", "decode": "deepep-ll"}
SGLANG_DEEPEP_MODE = {"deepep-normal": "normal", "deepep-ll": "low_latency"}
PD_MASTER = {"prefill": "PREFILL_MASTER_IP:5000", "decode": "DECODE_MASTER_IP:5000"}
PD_FILES = {"prefill": "prefill.json", "decode": "decode.json"}


def sglang_launch_line(placement: Placement, path: str | None = None, model: str = "MODEL",
                       node_rank: int = 0, disaggregation: str | None = None) -> str:
    """The SGLang launch command for the placement's deployment, complete as SGLang 0.5.23's
    own argument parsing and topology check need it: one expert-parallel rank per GPU over the
    whole tensor-parallel span (``--tp-size`` = ``--ep-size`` = GPUs; a wider EP than TP is
    refused at start-up as an inconsistent topology), ``--nnodes``/``--node-rank``/
    ``--dist-init-addr`` on several nodes, and ``--ep-num-redundant-experts`` equal to the
    file's extra slots. ``path`` is the ``--init-expert-location`` file (none: SGLang's
    trivial layout). ``disaggregation`` (``"prefill"`` or ``"decode"``): the line of that
    instance of a prefill-decode disaggregated deployment, ``--disaggregation-mode`` and the
    phase's DeepEP kernel (``--moe-a2a-backend deepep --deepep-mode normal|low_latency``)."""
    G, M = placement.num_gpus, placement.num_nodes
    args = ["python", "-m", "sglang.launch_server", "--model-path", model,
            "--tp-size", str(G), "--ep-size", str(G)]
    if M > 1:
        master = SGLANG_MASTER if disaggregation is None else PD_MASTER[disaggregation]
        args += ["--nnodes", str(M), "--node-rank", str(node_rank), "--dist-init-addr", master]
    if path is not None:
        args += ["--init-expert-location", path]
        if placement.num_replicas:
            args += ["--ep-num-redundant-experts", str(placement.num_replicas)]
    if disaggregation is not None:
        if disaggregation not in PD_KERNEL:
            raise InputError("export", "disaggregation", f"{disaggregation!r} is not a phase",
                             f"use one of {PD_PHASES}")
        args += ["--disaggregation-mode", disaggregation, "--moe-a2a-backend", "deepep",
                 "--deepep-mode", SGLANG_DEEPEP_MODE[PD_KERNEL[disaggregation]]]
    return " ".join(shlex.quote(a) for a in args)


def _node_note(placement: Placement, master: str = SGLANG_MASTER) -> str:
    M = placement.num_nodes
    if M == 1:
        return ""
    return (f"\n  (node r of {M} runs the same line with --node-rank r, r = 0..{M - 1}; "
            f"{master} is node 0's address; {placement.num_gpus // M} GPUs a node)")


def apply_launch_hint(placement: Placement, checkpoint: str) -> str:
    """How to serve a checkpoint rewritten by ``apply``: contiguous expert parallelism over
    the placement's GPUs, the engines' default layout, no placement file."""
    return ("  vLLM:   --enable-expert-parallel (--expert-placement-strategy linear, the "
            "default)\n"
            "  SGLang: " + sglang_launch_line(placement, None, model=checkpoint)
            + " (--init-expert-location trivial, the default)" + _node_note(placement))


def check_deployment(placement: Placement, *, num_gpus: int | None = None,
                     num_nodes: int | None = None, replicas: int | None = None) -> None:
    """Refuse a placement for another deployment than the one asked for (``InputError``).

    The engines do not: SGLang 0.5.23 loads a 288-slot file for 32 GPUs under
    ``--ep-num-redundant-experts 0`` or ``--ep-size 16`` without a word, so a mismatch would
    only show as wrong experts on wrong GPUs.
    """
    src = placement.source
    if num_gpus is not None and num_gpus != placement.num_gpus:
        raise InputError(src, "num_gpus", f"placed for {placement.num_gpus} GPUs, the deployment "
                         f"has {num_gpus}", f"solve a placement with --gpus {num_gpus}")
    if num_nodes is not None and num_nodes != placement.num_nodes:
        raise InputError(src, "num_nodes", f"placed for {placement.num_nodes} nodes, the "
                         f"deployment has {num_nodes}", f"solve a placement with --nodes {num_nodes}")
    if replicas is not None and replicas != placement.num_replicas:
        raise InputError(src, "num_replicas", f"{placement.num_slots} slots are "
                         f"{placement.num_experts} experts + {placement.num_replicas} replicas, the "
                         f"deployment has {replicas}", f"solve a placement with --replicas {replicas}")


def launch_flags(fmt: str, path: str, placement: Placement) -> str:
    """How to load an exported file: the serving-stack flags, config keys and conditions."""
    R = placement.num_replicas
    ep = placement.num_gpus
    if fmt in ("sglang", "sglang-logical-count"):
        return ("SGLang: " + sglang_launch_line(placement, path)
                + _node_note(placement)
                + ("\n  (SGLang runs its own EPLB on these counts at start-up)"
                   if fmt == "sglang-logical-count" else ""))
    if fmt == "trtllm":
        return (f"TensorRT-LLM (PyTorch backend, wide EP): in the LLM API options YAML "
                f"(trtllm-serve / trtllm-bench --extra_llm_api_options FILE, or LLM(**options)):\n"
                f"  enable_attention_dp: true\n"
                f"  moe_config: {{backend: WIDEEP, load_balancer: {path}}}\n"
                f"  (older releases: moe_load_balancer: {path}); serve with --ep_size {ep} "
                f"(--tp_size {ep}); layer_updates_per_iter: 0 keeps the placement static")
    if fmt == "vllm-ascend":
        return ("vllm-ascend: --enable-expert-parallel --additional-config "
                f"'{{\"eplb_config\":{{\"expert_map_path\":\"{path}\"}}}}'\n"
                "  (vllm-ascend loads a static expert map only for w8a8_dynamic-quantized "
                "models; other models ignore it or refuse to start)")
    if fmt == "vllm-pr49572":
        return (f"vLLM with PR 49572 (unmerged): --enable-expert-parallel --enable-eplb "
                f"--eplb-config '{{\"initial_expert_map_path\":\"{path}\","
                f"\"num_redundant_experts\":{R},\"step_interval\":1000000000}}'\n"
                "  (the map is applied through EPLB's weight transfer, so --enable-eplb is "
                "needed; a huge step_interval stops online rebalancing from replacing it)")
    if fmt == "vllm-pr41141":
        return (f"vLLM with PR 41141 (unmerged): --enable-expert-parallel --enable-eplb "
                f"--eplb-config '{{\"initial_mapping_path\":\"{path}\","
                f"\"disable_online_rebalancing\":true,\"num_redundant_experts\":{R}}}'")
    return f"DeepSeek EPLB arrays in {path} (phy2log, log2phy, logcnt; MoE layers only)"


def _torch_save(obj: dict[str, Any], tmp: Path) -> None:
    """A real torch file (SGLang reads ``.pt`` with ``torch.load(weights_only=True)``)."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "writing a .pt placement", "torch") from None
    torch.save({k: torch.tensor(np.asarray(v), dtype=torch.int64) for k, v in obj.items()},
               str(tmp))


def to_trtllm(placement: Placement, moe_layer_ids: list[int]) -> dict[str, Any]:
    """TensorRT-LLM MoE load-balancer config: ``num_slots`` and, per hidden-layer id, the
    logical expert of every slot (rank-major), static (``layer_updates_per_iter: 0``)."""
    return {"num_slots": placement.num_slots,
            "initial_global_assignments": {int(h): placement.phy2log[j].tolist()
                                           for j, h in enumerate(moe_layer_ids)},
            "layer_updates_per_iter": 0}


def _yaml_trtllm(cfg: dict[str, Any]) -> str:
    """The YAML TensorRT-LLM's example writes: integer layer keys, inline slot lists."""
    lines = [f"num_slots: {cfg['num_slots']}", "initial_global_assignments:"]
    for h, row in cfg["initial_global_assignments"].items():
        lines.append(f"  {h}: [{', '.join(str(int(e)) for e in row)}]")
    lines.append(f"layer_updates_per_iter: {cfg['layer_updates_per_iter']}")
    return "\n".join(lines) + "\n"


def export_placement(placement: Placement, fmt: str, path: str | os.PathLike[str], *,
                     num_hidden_layers: int | None = None, moe_layer_ids: list[int] | None = None,
                     load: np.ndarray | None = None, layout: ModelLayout | None = None,
                     num_gpus: int | None = None, num_nodes: int | None = None,
                     replicas: int | None = None) -> str:
    """Write ``placement`` as ``fmt`` atomically; returns how to load it (flags, conditions).

    With ``layout`` the MoE layer ids and hidden-layer count are checked against the model
    (``InputError`` on a mismatch) and fill in whatever the placement does not record.
    SGLang formats written to a ``.pt`` path are torch files (torch needed). ``num_gpus``,
    ``num_nodes`` and ``replicas`` are the deployment's: a placement for another is refused
    (``check_deployment``), before anything is written.
    """
    if fmt not in FORMATS:
        raise InputError("export", "--format", f"unknown format {fmt!r}", f"use one of {FORMATS}")
    check_deployment(placement, num_gpus=num_gpus, num_nodes=num_nodes, replicas=replicas)
    if layout is not None:
        from moeplace.models import check_layer_ids

        given = moe_layer_ids if moe_layer_ids is not None else placement.moe_layer_ids
        num_hidden_layers, moe_layer_ids = check_layer_ids(
            layout, given, placement.num_layers, placement.source, num_hidden_layers)
        if placement.num_experts != layout.num_experts:
            raise InputError(placement.source, "num_experts", f"{placement.num_experts}, but "
                             f"{layout.name} has {layout.num_experts} routed experts",
                             "solve a placement for this model")
    as_pt = str(path).endswith(".pt")
    if as_pt and fmt not in ("sglang", "sglang-logical-count"):
        raise InputError(path, "--out", f"{fmt} is not a torch format",
                         "use .pt only with --format sglang or sglang-logical-count")
    if as_pt:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise MissingDependencyError("torch", "writing a .pt placement", "torch") from None
    with atomic_path(path) as tmp:
        if fmt == "trtllm":
            _, ids = _hidden_rows(placement, num_hidden_layers, moe_layer_ids)
            tmp.write_text(_yaml_trtllm(to_trtllm(placement, ids)))
        elif fmt == "eplb":
            with open(tmp, "wb") as fh:
                np.savez(fh, **to_eplb(placement))
        elif fmt == "vllm-pr41141":
            rec = {"record_type": "eplb_initial_mapping", "version": 1,
                   "num_redundant_experts": placement.num_replicas,
                   "num_slots": placement.num_slots,
                   "initial_global_assignments": {str(l): placement.phy2log[l].tolist()
                                                  for l in range(placement.num_layers)}}
            tmp.write_text(json.dumps(rec) + "\n")
        else:
            if fmt == "sglang":
                obj: Any = to_sglang(placement, num_hidden_layers, moe_layer_ids)
            elif fmt == "sglang-logical-count":
                if load is None:
                    raise InputError("export", "--stats", "sglang-logical-count writes routing "
                                     "counts, not a placement", "pass --stats TRACE_OR_STATS")
                _, ids = _hidden_rows(placement, num_hidden_layers, moe_layer_ids)
                obj = to_sglang_logical_count(load, ids, num_hidden_layers)
            elif fmt == "vllm-ascend":
                obj = to_vllm_ascend(placement)
            else:  # vllm-pr49572: one [P] list per MoE layer
                obj = placement.phy2log.tolist()
            if as_pt:
                _torch_save(obj, tmp)
            else:
                tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    return launch_flags(fmt, str(path), placement)


def check_disaggregated(prefill: Placement, decode: Placement,
                        moe_layer_ids: list[int] | None = None) -> None:
    """Refuse (``InputError``) a pair of placements that cannot serve one model's prefill and
    decode instances: other MoE layers or expert counts, or a placement recorded as solved for
    the other phase or another kernel (``solve --phase`` records ``phase`` and ``dispatch`` in
    its ``info``). GPU, node and replica counts may differ: the instances are separate."""
    p, d = prefill, decode
    for field, a, b in (("num_layers", p.num_layers, d.num_layers),
                        ("num_experts", p.num_experts, d.num_experts)):
        if a != b:
            raise InputError(d.source, field, f"{b}, but the prefill placement {p.source} has {a}",
                             "solve both placements for one model")
    ids = (p.moe_layer_ids, d.moe_layer_ids)
    if moe_layer_ids is None and ids[0] is not None and ids[1] is not None and \
            tuple(ids[0]) != tuple(ids[1]):
        raise InputError(d.source, "moe_layer_ids", "the MoE layers differ from those of the "
                         f"prefill placement {p.source}", "solve both placements for one model")
    for role, plc in (("prefill", p), ("decode", d)):
        other = "decode" if role == "prefill" else "prefill"
        solved = plc.info.get("phase")
        if solved is not None and solved != role:
            raise InputError(plc.source, "phase", f"solved with --phase {solved}, given as "
                             f"--{role}", f"pass it as --{other}, or solve with --phase {role}")
        kernel = plc.info.get("dispatch")
        if kernel is not None and kernel != PD_KERNEL[role]:
            raise InputError(plc.source, "dispatch", f"solved for {kernel}, but SGLang's {role} "
                             f"instance runs {PD_KERNEL[role]} (--deepep-mode "
                             f"{SGLANG_DEEPEP_MODE[PD_KERNEL[role]]})",
                             f"solve it with --phase {role} and no --dispatch")


def export_disaggregated(prefill: Placement, decode: Placement, out_dir: str | os.PathLike[str],
                         *, fmt: str = "sglang", num_hidden_layers: int | None = None,
                         moe_layer_ids: list[int] | None = None,
                         layout: ModelLayout | None = None) -> str:
    """Write the placements of a prefill-decode disaggregated SGLang deployment into the new
    directory ``out_dir`` (``prefill.json``, ``decode.json``: SGLang's
    ``--init-expert-location`` files) atomically, both or nothing; returns the launch line of
    each instance (``sglang_launch_line`` with ``disaggregation``) and how to route between
    them. The pair is checked first (``check_disaggregated``), each placement like
    ``export_placement`` (``layout``, ``num_hidden_layers``, ``moe_layer_ids``).
    """
    if fmt != "sglang":
        raise InputError("export", "--format", f"{fmt} has no prefill-decode launch here",
                         "use --format sglang with --prefill/--decode")
    check_disaggregated(prefill, decode, moe_layer_ids)
    plcs = {"prefill": prefill, "decode": decode}
    with atomic_path(out_dir, directory=True) as tmp:
        tmp.mkdir()
        for role, plc in plcs.items():
            export_placement(plc, "sglang", tmp / PD_FILES[role], layout=layout,
                             num_hidden_layers=num_hidden_layers, moe_layer_ids=moe_layer_ids)
    lines = []
    for role, plc in plcs.items():
        path = os.path.join(os.fspath(out_dir), PD_FILES[role])
        lines.append(f"SGLang {role}: " + sglang_launch_line(plc, path, disaggregation=role)
                     + _node_note(plc, PD_MASTER[role]))
    lines.append("  (two instances on GPUs of their own, KV cache sent from prefill to decode "
                 "by SGLang's --disaggregation-transfer-backend, mooncake by default; route "
                 "requests through SGLang's router: python -m sglang_router.launch_router "
                 "--pd-disaggregation --prefill http://PREFILL_IP:30000 "
                 "--decode http://DECODE_IP:30000)")
    return "\n".join(lines)


def read_placement(path: str | os.PathLike[str], fmt: str = "auto", *, num_gpus: int | None = None,
                   num_nodes: int = 1, num_experts: int | None = None,
                   moe_layer_ids: list[int] | None = None) -> Placement:
    """Read any exported format (or moeplace JSON) back into a ``Placement``.

    SGLang maps keep the rows of the given MoE layers (all rows when none are given); formats
    without a GPU count (SGLang, vLLM PRs, EPLB) need ``num_gpus``.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "path", "no such file", "check the path")
    if fmt == "auto":
        fmt = _detect(p)
    src = str(p)

    def need_gpus() -> int:
        if num_gpus is None:
            raise InputError(p, "num_gpus", f"{fmt} files do not record the GPU count",
                             "pass --gpus (the expert-parallel size)")
        return num_gpus

    if p.stat().st_size > MAX_PLACEMENT_BYTES:
        raise InputError(p, "file", f"{p.stat().st_size} bytes is too large for a placement",
                         f"placement files stay under {MAX_PLACEMENT_BYTES >> 20} MiB")
    # Stacks load copies of one expert on one GPU as they are: so does everything read here.
    kw: dict[str, Any] = {"source": src, "colocated": True}
    try:
        if fmt == "moeplace":
            return Placement.load(p)
        if fmt == "eplb":
            z = np.load(p, allow_pickle=False)
            if "phy2log" not in z.files:
                raise InputError(p, "phy2log", "array missing", "export with --format eplb")
            return Placement(z["phy2log"], need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=moe_layer_ids, **kw)
        if fmt == "vllm-pr41141":
            with open(p, "rb") as fh:  # the first record; a line no longer than a JSON file
                rec = loads_json(fh.readline(256 << 20), p, fmt)
            ga = rec["initial_global_assignments"]
            rows = [ga[str(l)] for l in range(len(ga))]
            return Placement(np.array(rows), need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=moe_layer_ids, **kw)
        if fmt == "trtllm":
            cfg = read_trtllm_yaml(p)
            ids = sorted(cfg["initial_global_assignments"])
            rows = np.array([cfg["initial_global_assignments"][h] for h in ids])
            return Placement(rows, need_gpus(), num_nodes, num_experts, moe_layer_ids=ids, **kw)
        if fmt == "sglang" and p.suffix == ".pt":
            from moeplace.traces.importers._common import to_numpy, torch_load

            obj = torch_load(p)
            if not isinstance(obj, dict):
                raise InputError(p, "file", "not a dict", "export with --format sglang")
            obj = {k: to_numpy(v).tolist() for k, v in obj.items()}
        else:
            obj = read_json(p, fmt, f"write it with moeplace export --format {fmt}")
        if fmt == "vllm-ascend":
            layers = sorted(obj["layer_list"], key=lambda d: d["layer_id"])
            rows = [[e for dev in sorted(d["device_list"], key=lambda x: x["device_id"])
                     for e in dev["device_expert"]] for d in layers]
            return Placement(np.array(rows), int(layers[0]["device_count"]), num_nodes,
                             num_experts, moe_layer_ids=moe_layer_ids, **kw)
        if fmt == "vllm-pr49572":
            arr = np.array(obj)
            if arr.ndim == 1:
                raise InputError(p, "map", "one flat list gives no per-layer placement",
                                 "export per-layer lists")
            return Placement(arr, need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=moe_layer_ids, **kw)
        if fmt == "sglang":
            if set(obj) != {"physical_to_logical_map"}:
                raise InputError(p, "keys", f"{sorted(obj)}: SGLang accepts exactly one key",
                                 "keep only physical_to_logical_map")
            rows = np.array(obj["physical_to_logical_map"])
            ids = moe_layer_ids if moe_layer_ids is not None else list(range(len(rows)))
            return Placement(rows[ids], need_gpus(), num_nodes, num_experts,
                             moe_layer_ids=ids, **kw)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError,
            zipfile.BadZipFile) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(p, fmt, f"malformed ({type(exc).__name__}: {exc})",
                         f"write it with moeplace export --format {fmt}") from None
    raise InputError(p, "format", f"{fmt!r} cannot be read as a placement",
                     "sglang-logical-count holds statistics; use it with solve")


def read_trtllm_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a TensorRT-LLM MoE load-balancer YAML: ``num_slots`` (int) and
    ``initial_global_assignments`` (hidden-layer id -> ``num_slots`` expert ids)."""
    p = Path(path)
    if p.stat().st_size > MAX_PLACEMENT_BYTES:
        raise InputError(p, "file", "too large for a load-balancer config",
                         f"configs stay under {MAX_PLACEMENT_BYTES >> 20} MiB")
    text = p.read_text()
    try:
        import yaml

        cfg = yaml.safe_load(text)
    except ImportError:
        cfg = _mini_yaml(text, p)
    except Exception as exc:  # yaml.YAMLError and friends
        raise InputError(p, "file", f"not valid YAML ({str(exc).splitlines()[0]})",
                         "write it with moeplace export --format trtllm") from None
    if not isinstance(cfg, dict):
        raise InputError(p, "file", "not a YAML mapping", "write it with moeplace export")
    P = cfg.get("num_slots")
    ga = cfg.get("initial_global_assignments")
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise InputError(p, "num_slots", f"{P!r} is not a positive integer",
                         "give the physical slots per layer")
    if not isinstance(ga, dict) or not ga:
        raise InputError(p, "initial_global_assignments", "missing or empty",
                         "give each MoE layer's slot list")
    out: dict[int, list[int]] = {}
    for h, row in ga.items():
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise InputError(p, "initial_global_assignments", f"key {h!r} is not a layer id",
                             "key by hidden-layer id")
        if (not isinstance(row, list) or len(row) != P
                or not all(isinstance(e, int) and not isinstance(e, bool) for e in row)):
            raise InputError(p, f"initial_global_assignments.{h}", f"not a list of {P} "
                             "integer expert ids", "give one expert id per slot")
        out[h] = row
    return {**cfg, "initial_global_assignments": out}


def _mini_yaml(text: str, p: Path) -> dict[str, Any]:
    """The subset of YAML the load-balancer config uses, for installs without PyYAML."""
    cfg: dict[str, Any] = {}
    section: dict[Any, Any] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, val = line.strip().partition(":")
        if not sep:
            raise InputError(f"{p}:{n}", "line", "not 'key: value'", "write it with moeplace")
        try:
            k: Any = int(key) if line.startswith(" ") else key
            v = loads_json(val, f"{p}:{n}", key) if val.strip() else None
        except ValueError:
            raise InputError(f"{p}:{n}", key, "not a number or list", "write it with moeplace") from None
        if line.startswith(" "):
            if section is None:
                raise InputError(f"{p}:{n}", "line", "indented outside a section", "fix indentation")
            section[k] = v
        elif v is None:
            section = cfg[k] = {}
        else:
            cfg[k], section = v, None
    return cfg


def _detect(p: Path) -> str:
    if p.suffix in (".yaml", ".yml"):
        return "trtllm"
    if p.suffix == ".pt":
        return "sglang"
    if p.suffix == ".npz":
        return "eplb"
    if p.suffix == ".jsonl":
        return "vllm-pr41141"
    try:
        obj = json.loads(p.read_text())
    except ValueError:
        raise InputError(p, "file", "not JSON, JSONL or .npz", "pass --format") from None
    if isinstance(obj, list):
        return "vllm-pr49572"
    if isinstance(obj, dict):
        if "physical_to_logical_map" in obj:
            return "sglang"
        if "layer_list" in obj:
            return "vllm-ascend"
        if obj.get("format") == "moeplace.placement" or "phy2log" in obj:
            return "moeplace"
        if "logical_count" in obj:
            return "sglang-logical-count"
    raise InputError(p, "format", "not a known placement file", "pass --format")
