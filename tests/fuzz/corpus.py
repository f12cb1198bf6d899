"""Seed files of every format moeplace reads, the mutations a careless or hostile user applies to
them, and the commands that read them: shared by the CI fuzz tests and the longer local campaign
(``benchmarks/fuzz_campaign.py``). Every mutator takes a ``random.Random`` so a case reproduces
from its seed."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# One small model shape for every seed: 3 MoE layers (hidden 1..3 of 4), top-2 of 8 experts.
N, L, K, H, T = 8, 3, 2, 4, 48
GPUS = 4


def _experts(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, L, N)), axis=2)[:, :, :K].astype(np.uint8)


# ---- seeds: name -> writer(dir) -> path --------------------------------------------------------
def seed_parquet(d: Path) -> Path:
    from moeplace.traces import Trace, TraceMeta, write_trace

    meta = TraceMeta(num_experts=N, top_k=K, moe_layer_ids=(1, 2, 3), num_hidden_layers=H,
                     model="fuzz")
    # A phase column (each request's first 3 tokens prefill, the rest decode): --phase reads it.
    phase = (np.tile(np.arange(T // 6), 6) >= 3).astype(np.int8)
    tr = Trace(_experts(), meta, tokens={"request": np.repeat(np.arange(6), T // 6),
                                         "phase": phase})
    return write_trace(tr, d / "trace.parquet")


def seed_pd_placements(d: Path) -> Path:
    """The prefill and decode placements of one model (``export --prefill --decode``): the
    prefill one is ``placement.json`` (``seed_placement``), the decode one this, on 2 GPUs."""
    from moeplace.placement import Placement

    phy = np.stack([np.random.default_rng(l).permutation(N) for l in range(L)])
    plc = Placement(phy, 2, 1, N, moe_layer_ids=(1, 2, 3), info={"phase": "decode",
                                                                "dispatch": "deepep-ll"})
    return plc.save(d / "decode.json")


def seed_npz(d: Path) -> Path:
    p = d / "trace.npz"
    np.savez(p, experts=_experts(), prompt_id=np.repeat(np.arange(6), T // 6).astype(np.int32),
             moe_layer_ids=np.array([1, 2, 3], np.int16))
    return p


def seed_stats(d: Path) -> Path:
    from moeplace.traces import compute_stats, read_trace

    tr = read_trace(seed_parquet(d))
    return compute_stats(tr).save(d / "stats.npz")


def seed_placement(d: Path) -> Path:
    from moeplace.placement import contiguous

    plc = contiguous(L, N, GPUS)
    p = d / "placement.json"
    plc.save(p)
    obj = json.loads(p.read_text())
    obj["moe_layer_ids"] = [1, 2, 3]
    p.write_text(json.dumps(obj))
    return p


def _hidden_rows() -> np.ndarray:
    full = np.zeros((T, H, K), np.int32)
    full[:, 1:] = _experts()
    return full


def _npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def seed_vllm(d: Path) -> Path:
    full = _hidden_rows()
    recs = [{"id": f"cmpl-{i}", "usage": {"prompt_tokens": 4},
             "choices": [{"index": 0, "routed_experts": _npy_b64(full[i * 8:(i + 1) * 8])}]}
            for i in range(T // 8)]
    p = d / "vllm.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return p


def seed_sglang(d: Path) -> Path:
    full = _hidden_rows()
    recs = [{"text": "x", "meta_info": {"id": str(i), "prompt_tokens": 4, "completion_tokens": 5,
                                         "routed_experts": base64.b64encode(
                                             full[i * 8:(i + 1) * 8].astype("<i4").tobytes()
                                         ).decode()}}
            for i in range(T // 8)]
    p = d / "sglang.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return p


def seed_megatron(d: Path) -> Path:
    e = _experts().astype(int)
    p = d / "router_trace_rank0.jsonl"
    lines = []
    for step in range(2):
        rows = e[step * (T // 2):(step + 1) * (T // 2)]
        for l in range(L):
            lines.append(json.dumps({"step": step, "stage": "train", "block": "decoder",
                                     "layer": l + 1, "rank": 0, "num_tokens": len(rows),
                                     "topk": K, "top_indices": rows[:, l].tolist()}))
    p.write_text("\n".join(lines) + "\n")
    return p


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def seed_checkpoint(d: Path) -> Path:
    """A two-shard Mixtral-layout checkpoint (per-expert tensors) with an index and config."""
    ck = d / "ckpt"
    ck.mkdir()
    rng = np.random.default_rng(0)
    hid, inter = 4, 6
    shards: list[dict[str, np.ndarray]] = [{}, {}]
    for h in range(1, H):
        s = shards[h % 2]
        pre = f"model.layers.{h}.block_sparse_moe"
        s[f"{pre}.gate.weight"] = rng.standard_normal((N, hid))
        for e in range(N):
            s[f"{pre}.experts.{e}.w1.weight"] = rng.standard_normal((inter, hid))
            s[f"{pre}.experts.{e}.w2.weight"] = rng.standard_normal((hid, inter))
    shards[0]["model.embed_tokens.weight"] = rng.standard_normal((16, hid))
    weight_map = {}
    for i, s in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        (ck / name).write_bytes(_safetensors(s))
        weight_map.update(dict.fromkeys(s, name))
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                  "weight_map": weight_map}))
    (ck / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hid,
        "intermediate_size": inter, "num_hidden_layers": H, "num_local_experts": N,
        "num_experts_per_tok": K}))
    return ck


SEEDS: dict[str, Callable[[Path], Path]] = {
    "parquet": seed_parquet, "npz": seed_npz, "stats": seed_stats, "placement": seed_placement,
    "vllm": seed_vllm, "sglang": seed_sglang, "megatron": seed_megatron,
    "checkpoint": seed_checkpoint, "decode_placement": seed_pd_placements,
}


# ---- mutations -------------------------------------------------------------------------------
def _deep(n: int) -> str:
    return "[" * n + "]" * n


WILD_VALUES: list[Any] = ["eight", None, float("nan"), float("inf"), -1, 0, 2**70, -(2**63),
                          1e300, True, [], {}, [1, [2]], "", "x" * 1000, 3.5, [[-1]],
                          {"a": None}]


def mutate_json_value(obj: Any, rng: random.Random) -> Any:
    """Replace, delete or add one value somewhere inside ``obj`` (returns a new object)."""
    obj = json.loads(json.dumps(obj))
    paths: list[list[Any]] = []

    def walk(o: Any, path: list[Any], depth: int) -> None:
        paths.append(path)
        if depth > 6:
            return
        if isinstance(o, dict):
            for k2, v in o.items():
                walk(v, [*path, k2], depth + 1)
        elif isinstance(o, list):
            for i in rng.sample(range(len(o)), min(len(o), 4)):
                walk(o[i], [*path, i], depth + 1)

    walk(obj, [], 0)
    path = rng.choice(paths)
    if not path:
        return rng.choice(WILD_VALUES)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    action = rng.random()
    if action < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif action < 0.2 and isinstance(parent, list) and parent:
        parent.append(parent[-1])
    else:
        parent[path[-1]] = rng.choice(WILD_VALUES)
    return obj


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Truncate, flip, insert or splice bytes."""
    if not data:
        return b"\x00"
    kind = rng.choice(["truncate", "flip", "insert", "zero", "dup"])
    if kind == "truncate":
        return data[:rng.randrange(len(data))]
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "zero":
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 64)] = b"\x00" * len(b[i:i + 64])
    else:
        i = rng.randrange(len(b))
        b[i:i] = b[i:i + rng.randint(1, 256)]
    return bytes(b)


def _npy_header_bomb(shape: tuple[int, ...], dtype: str = "<u1") -> bytes:
    """A .npy whose header declares ``shape`` but holds almost no data."""
    head = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + b"\x00" * 64


def mutate_npz(path: Path, rng: random.Random) -> bytes:
    """Replace, drop or add one member of an .npz (structure-aware), or corrupt its bytes."""
    members: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            members[n] = z.read(n)
    name = rng.choice(sorted(members))
    choice = rng.random()
    if choice < 0.1:
        return mutate_bytes(path.read_bytes(), rng)
    if choice < 0.2:
        del members[name]
    elif choice < 0.3:
        members[name] = _npy_header_bomb((rng.choice([10**6, 10**9, 2**40]), L, K))
    else:
        arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
        makers: list[Callable[[], Any]] = [
            lambda: arr.astype(np.float64), lambda: arr.reshape(-1),
            lambda: arr.reshape(-1)[:0], lambda: arr[..., :1] if arr.ndim else arr,
            lambda: np.array("x" * 10), lambda: np.array(np.nan),
            lambda: np.array([2**63 + 5], np.uint64), lambda: np.full(arr.shape, 255, np.uint8),
            lambda: np.full(arr.shape, -7, np.int64), lambda: np.array([{"a": 1}], dtype=object),
            lambda: np.full(arr.shape, 1000, np.int64),
        ]
        try:  # some conversions do not apply to some members (a string header as float)
            new = makers[rng.randrange(len(makers))]()
        except (TypeError, ValueError):
            new = np.array("x" * 10)
        buf = io.BytesIO()
        np.save(buf, new, allow_pickle=True)
        members[name] = buf.getvalue()
    if rng.random() < 0.2:
        members[rng.choice(["num_experts.npy", "missing_id.npy", "weights.npy"])] = (
            _npy_bytes(rng.choice([np.array(-3), np.array("sixty"), np.array([1, 2]),
                                   np.array(np.nan), np.array(10**12)])))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return out.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def mutate_parquet(path: Path, rng: random.Random) -> bytes:
    """Mutate the ``moeplace`` header inside the Parquet schema, a column, or the bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    choice = rng.random()
    if choice < 0.25:
        return mutate_bytes(path.read_bytes(), rng)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {})
    header = json.loads(meta[b"moeplace"])
    if choice < 0.75:
        kind = rng.random()
        if kind < 0.1:
            raw = rng.choice([_deep(50_000), "[1, 2]", '"x"', "{", "null"]).encode()
        else:
            raw = json.dumps(mutate_json_value(header, rng)).encode()
        meta[b"moeplace"] = raw
        table = table.replace_schema_metadata(meta)
    else:
        cols = table.column_names
        if "phase" in cols and rng.random() < 0.25:  # foreign phase values and types
            vals = rng.choice([[2**40, -1, 7], [None, 1, 0], ["decode", "x", "0"], [0.5, 1.0, 0]])
            table = table.set_column(cols.index("phase"), "phase",
                                     pa.array((vals * table.num_rows)[:table.num_rows]))
        elif rng.random() < 0.4 and len(cols) > 1:
            table = table.drop_columns([rng.choice(cols)])
        else:
            width = rng.choice([1, L * K - 1, L * K + 3])
            arr = pa.array([b"\x07" * width] * table.num_rows, type=pa.binary(width))
            table = table.set_column(0, "experts", arr)
            table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def mutate_jsonl(path: Path, rng: random.Random) -> bytes:
    """Mutate one record of a JSON-lines file (values, base64, nesting) or its bytes."""
    lines = path.read_text().splitlines()
    choice = rng.random()
    if choice < 0.2:
        return mutate_bytes(path.read_bytes(), rng)
    i = rng.randrange(len(lines))
    if choice < 0.3:
        lines[i] = rng.choice([_deep(100_000), "{", "\xff\xfe", "null", "[]", "1e999"])
    elif choice < 0.4:
        rec = json.loads(lines[i])
        text = json.dumps(rec)
        for key in ("routed_experts",):
            if key in text:
                b64 = rng.choice(["abc", "!!!!", "AAAA" * 3, base64.b64encode(b"\x01" * 7).decode(),
                                  _npy_b64(np.array([[[2**40]]], np.int64))])
                rec = _replace_key(rec, key, b64)
        lines[i] = json.dumps(rec)
    else:
        lines[i] = json.dumps(mutate_json_value(json.loads(lines[i]), rng))
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _replace_key(o: Any, key: str, value: Any) -> Any:
    if isinstance(o, dict):
        return {k: (value if k == key else _replace_key(v, key, value)) for k, v in o.items()}
    if isinstance(o, list):
        return [_replace_key(v, key, value) for v in o]
    return o


def mutate_json_file(path: Path, rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return mutate_bytes(path.read_bytes(), rng)
    if rng.random() < 0.1:
        return rng.choice([_deep(60_000), "1e400", '{"num_gpus": 1e400}']).encode()
    return json.dumps(mutate_json_value(json.loads(path.read_text()), rng)).encode()


def mutate_checkpoint(ck: Path, rng: random.Random) -> None:
    """Corrupt one file of a checkpoint directory in place (header, offsets, index, config)."""
    choice = rng.random()
    shards = sorted(ck.glob("*.safetensors"))
    if choice < 0.45:
        s = rng.choice(shards)
        raw = s.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        names = [k for k in header if k != "__metadata__"]
        name = rng.choice(names)
        ent = header[name]
        b, e = ent["data_offsets"]
        kind = rng.choice(["reverse", "negative", "overlap", "past", "noshape", "list", "dtype",
                           "value"])
        if kind == "reverse":
            ent["data_offsets"] = [e, b]
        elif kind == "negative":
            ent["data_offsets"] = [-8, e]
        elif kind == "overlap":
            other = header[rng.choice(names)]
            ent["data_offsets"] = list(other["data_offsets"])
        elif kind == "past":
            ent["data_offsets"] = [b, e + 10**6]
        elif kind == "noshape":
            ent.pop(rng.choice(["shape", "data_offsets", "dtype"]))
        elif kind == "list":
            header = [header]
        elif kind == "dtype":
            ent["dtype"] = rng.choice(["F64", "Q8", 5, None])
        else:
            header = mutate_json_value(header, rng)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        s.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    elif choice < 0.6:
        s = rng.choice(shards)
        s.write_bytes(mutate_bytes(s.read_bytes(), rng))
    elif choice < 0.8:
        idx = ck / "model.safetensors.index.json"
        obj = json.loads(idx.read_text())
        if rng.random() < 0.5:
            key = rng.choice(sorted(obj["weight_map"]))
            obj["weight_map"][key] = rng.choice(["../outside.safetensors", "/etc/passwd",
                                                 "missing.safetensors", 7, None])
            (ck.parent / "outside.safetensors").write_bytes(_safetensors({key: np.ones((2, 2))}))
        else:
            obj = mutate_json_value(obj, rng)
        idx.write_text(json.dumps(obj))
    else:
        cfg = ck / "config.json"
        obj = json.loads(cfg.read_text())
        if rng.random() < 0.5:
            obj[rng.choice(["n_group", "num_local_experts", "num_hidden_layers", "topk_group"])] = (
                rng.choice([3, 0, -2, "x", None, 10**9]))
        else:
            obj = mutate_json_value(obj, rng)
        cfg.write_text(json.dumps(obj))


MUTATORS: dict[str, Callable[[Path, random.Random], bytes]] = {
    "parquet": mutate_parquet, "npz": mutate_npz, "stats": mutate_npz,
    "placement": mutate_json_file, "vllm": mutate_jsonl, "sglang": mutate_jsonl,
    "megatron": mutate_jsonl,
}

# Commands that read each kind of file. ``{IN}`` is the mutated file, ``{OUT}`` a fresh output
# path, ``{TRACE}``/``{PLACEMENT}``/``{DECODE}``/``{CKPT}`` valid companions.
TRACE_COMMANDS = [
    ["analyze", "{IN}"], ["analyze", "{IN}", "--json"], ["stats", "{IN}", "--out", "{OUT}.npz"],
    ["convert", "{IN}", "{OUT}.parquet"], ["evaluate", "{IN}", "{PLACEMENT}", "--json"],
    ["solve", "{IN}", "--gpus", "4", "--time-limit", "1", "--out", "{OUT}.json"],
    ["replay", "{IN}", "--gpus", "4", "--interval", "64", "--order", "file", "--json"],
    ["solve", "{IN}", "--gpus", "4", "--time-limit", "1", "--phase", "decode", "--holdout",
     "0.5", "--out", "{OUT}.json"],
    ["evaluate", "{IN}", "{PLACEMENT}", "--phase", "prefill", "--json"],
    ["replay", "{IN}", "--gpus", "4", "--interval", "16", "--phase", "decode", "--json"],
]
COMMANDS: dict[str, list[list[str]]] = {
    "parquet": TRACE_COMMANDS, "npz": TRACE_COMMANDS, "vllm": TRACE_COMMANDS,
    "sglang": [[*c[:2], "--top-k", "2", *c[2:]] for c in TRACE_COMMANDS],
    "megatron": TRACE_COMMANDS,
    "stats": [["analyze", "{IN}"], ["analyze", "{IN}", "--json"],
              ["solve", "{IN}", "--gpus", "4", "--time-limit", "1", "--out", "{OUT}.json"],
              ["export", "{PLACEMENT}", "--format", "sglang-logical-count", "--stats", "{IN}",
               "--out", "{OUT}.json"]],
    "placement": [["evaluate", "{TRACE}", "{IN}"],
                  ["export", "{IN}", "--format", "sglang", "--out", "{OUT}.json"],
                  ["export", "{IN}", "--format", "eplb", "--out", "{OUT}.npz"],
                  ["export", "{IN}", "--format", "vllm-ascend", "--out", "{OUT}.json"],
                  ["solve", "{TRACE}", "--gpus", "4", "--time-limit", "1", "--current", "{IN}"],
                  ["export", "--prefill", "{IN}", "--decode", "{DECODE}", "--format", "sglang",
                   "--out-dir", "{OUT}"],
                  ["export", "--prefill", "{PLACEMENT}", "--decode", "{IN}", "--format",
                   "sglang", "--out-dir", "{OUT}"],
                  ["apply", "{IN}", "--checkpoint", "{CKPT}", "--out", "{OUT}"]],
    "checkpoint": [["apply", "{PLACEMENT}", "--checkpoint", "{IN}", "--out", "{OUT}"],
                   ["apply", "--invert", "--checkpoint", "{IN}", "--out", "{OUT}"]],
}

# Flag values to try on otherwise valid commands.
FLAG_VALUES = ["-1", "0", "nan", "inf", "-inf", "1e400", "eight", "", "99999999999999999999",
               "2147483648", "0.5", "1", "3", "1,1", "-0", "  ", "1e-300"]
FLAG_COMMANDS: list[tuple[list[str], list[str]]] = [
    (["analyze", "{TRACE}"], ["--top", "--drift-windows", "--num-experts", "--moe-layers",
                              "--plot", "--top-k", "--num-hidden-layers"]),
    (["stats", "{TRACE}", "--out", "{OUT}.npz"], ["--num-experts", "--moe-layers"]),
    (["evaluate", "{TRACE}", "{PLACEMENT}"], ["--window", "--expert-bytes", "--home",
                                              "--phase"]),
    (["solve", "{TRACE}", "--time-limit", "1", "--out", "{OUT}.json"],
     ["--gpus", "--nodes", "--replicas", "--balance-slack", "--time-limit", "--holdout",
      "--groups", "--respect-groups", "--seed", "--restarts", "--window", "--weights",
      "--tokens-per-step", "--hardware", "--model-shape", "--method", "--engine",
      "--dispatch", "--phase"]),
    (["synth", "--preset", "flame-moe-290m", "--tokens", "64", "--out", "{OUT}.parquet"],
     ["--tokens", "--seed", "--skew", "--affinity", "--stickiness", "--preset",
      "--prompt-tokens"]),
    (["export", "{PLACEMENT}", "--format", "sglang", "--out", "{OUT}.json"],
     ["--num-hidden-layers", "--moe-layers", "--format"]),
    (["export", "--prefill", "{PLACEMENT}", "--decode", "{DECODE}", "--format", "sglang",
      "--out-dir", "{OUT}"],
     ["--num-hidden-layers", "--moe-layers", "--format", "--gpus", "--model-shape", "--prefill",
      "--decode", "--out-dir"]),
    (["apply", "{PLACEMENT}", "--checkpoint", "{CKPT}", "--out", "{OUT}"], ["--moe-layers"]),
    (["demo"], ["--gpus"]),
    (["replay", "{TRACE}", "--gpus", "4", "--interval", "64", "--order", "file"],
     ["--gpus", "--nodes", "--replicas", "--groups", "--interval", "--window", "--policy",
      "--order", "--expert-bytes", "--hardware", "--plot", "--phase"]),
    (["simulate", "--tokens", "16", "--json"],
     ["--ep", "--tokens", "--hidden", "--top-k", "--experts", "--seed", "--kernel", "--hardware"]),
]


def fill(args: list[str], **paths: Any) -> list[str]:
    out = []
    for a in args:
        for key, val in paths.items():
            a = a.replace("{" + key + "}", str(val))
        out.append(a)
    return out
