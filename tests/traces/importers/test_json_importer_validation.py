"""vLLM, SGLang and Megatron importers (JSON, base64, .npy, .pt): every malformed record is one
typed error naming the record and field, and one CLI line with exit 2."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from moeplace.traces import import_trace, load_routing
from tests.bad_input import cli_fails, raises_input


def _npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def _vllm(routed, usage=None, model="m"):
    return {"id": "x", "model": model, "usage": {"prompt_tokens": 2} if usage is None else usage,
            "choices": [{"index": 0, "routed_experts": routed}]}


def _sgl(routed, pt=2, ct=2):
    return {"text": "", "meta_info": {"prompt_tokens": pt, "completion_tokens": ct,
                                      "routed_experts": routed}}


def _i32_b64(a) -> str:
    return base64.b64encode(np.asarray(a, "<i4").tobytes()).decode()


GOOD = np.array([[[0, 0], [1, 2]], [[0, 0], [3, 1]]], np.int64)  # [tokens, H=2, k=2]

CASES = [
    # name, file name, content (object -> JSON, str/bytes -> raw), kwargs, needle
    ("vllm choices not list", "a.json", {"choices": {"x": 1}}, {"fmt": "vllm"}, "choices"),
    ("vllm routed missing", "a.json", {"choices": [{"index": 0}]}, {"fmt": "vllm"},
     "routed_experts: missing"),
    ("vllm routed number", "a.json", _vllm(5), {"fmt": "vllm"}, "expected a base64 string"),
    ("vllm odd base64", "a.json", _vllm("QUJ"), {"fmt": "vllm"}, "not valid base64"),
    ("vllm base64 not npy", "a.json", _vllm(base64.b64encode(b"hello world").decode()),
     {"fmt": "vllm"}, "not .npy bytes"),
    ("vllm npy header lies", "a.json", _vllm(base64.b64encode(
        _npy_b64(np.zeros((2, 2, 2), np.int32)).encode()[:0] + base64.b64decode(
            _npy_b64(np.zeros((50, 2, 2), np.int32)))[:200]).decode()), {"fmt": "vllm"},
     "header declares"),
    ("vllm ragged list", "a.json", _vllm([[[1, 2]], [[1]]]), {"fmt": "vllm"},
     "routed_experts"),
    ("vllm 2^70 id", "a.json", _vllm([[[0, 0], [1, 2**70]]]), {"fmt": "vllm"},
     "64-bit"),
    ("vllm 2^63 id", "a.json", _vllm([[[0, 0], [1, 2**63 + 1]]]), {"fmt": "vllm"},
     "64-bit"),
    ("vllm huge id", "a.json", _vllm([[[0, 0], [1, 2**50]]]), {"fmt": "vllm"},
     "implausibly large"),
    ("vllm float ids", "a.json", _vllm([[[0.5, 0], [1, 2]]]), {"fmt": "vllm"},
     "not integers"),
    ("vllm bool ids", "a.json", _vllm([[[True, False], [True, True]]]), {"fmt": "vllm"},
     "not integers"),
    ("vllm usage list", "a.json", _vllm(GOOD.tolist(), usage=[1]), {"fmt": "vllm"},
     "usage"),
    ("vllm prompt tokens text", "a.json", _vllm(GOOD.tolist(), usage={"prompt_tokens": "x"}),
     {"fmt": "vllm"}, "is not an integer"),
    ("vllm 2-d array", "a.json", _vllm([[1, 2]]), {"fmt": "vllm"}, "is not [tokens"),
    ("vllm deep nesting", "a.json", "[" * 100_000 + "]" * 100_000, {"fmt": "vllm"},
     "nested too deeply"),
    ("vllm jsonl deep line", "a.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", {"fmt": "vllm"},
     "nested too deeply"),
    ("vllm huge int literal", "a.jsonl", '{"choices": [' + "9" * 5000 + "]}\n", {"fmt": "vllm"},
     "not valid JSON"),
    ("non-UTF-8", "a.json", b'{"choices": "\xff\xfe"}', {"fmt": "vllm"}, "not UTF-8"),
    ("vllm record not object", "a.json", [1, 2], {"fmt": "vllm"}, "not a JSON object"),
    ("sglang routed odd bytes", "a.json", _sgl(base64.b64encode(b"abcde").decode()),
     {"fmt": "sglang", "top_k": 2}, "whole number of int32"),
    ("sglang prompt tokens string", "a.json", _sgl(_i32_b64(GOOD.reshape(-1)), pt="2"),
     {"fmt": "sglang", "top_k": 2}, "is not an integer"),
    ("sglang no routed tokens", "a.json", _sgl(_i32_b64(GOOD.reshape(-1)), pt=0, ct=0),
     {"fmt": "sglang", "top_k": 2}, "leave no routed token"),
    ("sglang meta_info list", "a.json", {"meta_info": [1]}, {"fmt": "sglang"},
     "meta_info.routed_experts"),
    ("sglang split unknown", "a.json", _sgl(_i32_b64(np.zeros(12))), {"fmt": "sglang"},
     "--num-hidden-layers or --top-k"),
    ("sglang bad top_k", "a.json", _sgl(_i32_b64(np.zeros(12))),
     {"fmt": "sglang", "top_k": 0}, "below 1"),
    ("megatron ids string", "r.jsonl", {"layer": 1, "top_indices": "1,2"},
     {"fmt": "megatron"}, "are not integers"),
    ("megatron 2^70", "r.jsonl", {"layer": 1, "top_indices": [[1, 2**70]]},
     {"fmt": "megatron"}, "64-bit"),
    ("megatron layer string", "r.jsonl", {"layer": "one", "top_indices": [[1, 2]]},
     {"fmt": "megatron"}, "is not an integer"),
    ("megatron layer negative", "r.jsonl", {"layer": -1, "top_indices": [[1, 2]]},
     {"fmt": "megatron"}, "below 0"),
    ("megatron num_tokens null", "r.jsonl", {"layer": 1, "top_indices": [[1, 2]],
                                             "num_tokens": None},
     {"fmt": "megatron"}, "is not an integer"),
    ("megatron ragged", "r.jsonl", {"layer": 1, "top_indices": [[1, 2], [3]]},
     {"fmt": "megatron"}, "top_indices"),
    ("megatron rank float", "r.jsonl", {"layer": 1, "top_indices": [[1, 2]], "rank": 0.5},
     {"fmt": "megatron"}, "is not an integer"),
    ("megatron negative id", "r.jsonl", {"layer": 1, "top_indices": [[1, -2]]},
     {"fmt": "megatron"}, "negative expert id"),
]


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif path.suffix == ".jsonl":
        path.write_text(json.dumps(content) + "\n")
    else:
        path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("name,fname,content,kw,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_json_import(tmp_path, name, fname, content, kw, needle):
    path = _write(tmp_path / fname, content)
    raises_input(lambda: import_trace(path, **kw), needle)
    args = ["analyze", path, "--format", kw["fmt"]]
    if "top_k" in kw:
        args += ["--top-k", str(kw["top_k"])]
    # The CLI range-checks --top-k itself, before the importer sees it.
    cli_fails(args, "must be >= 1" if kw.get("top_k") == 0 else needle)


def test_auto_detect_deep_json(tmp_path):
    path = _write(tmp_path / "d.json", "[" * 100_000 + "]" * 100_000)
    raises_input(lambda: import_trace(path), "nested too deeply")
    cli_fails(["analyze", path], "nested too deeply")


def test_npy_file_header_checked_before_allocating(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.arange(16, dtype=np.int32).reshape(4, 2, 2) % 5)
    # A header declaring 10^10 rows with 64 bytes of data: refused from the header alone.
    header = {"descr": "<i4", "fortran_order": False, "shape": (10**10, 2, 2)}
    h = repr(header).encode()
    h += b" " * (64 - (10 + len(h) + 1) % 64) + b"\n"
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h
                                     + bytes(64))
    raises_input(lambda: import_trace(tmp_path / "x.npy"), "header declares")
    cli_fails(["analyze", tmp_path / "x.npy"], "header declares")
    (tmp_path / "ok.npy").write_bytes(buf.getvalue())
    assert import_trace(tmp_path / "ok.npy").num_tokens == 4


def test_sglang_dump_contents_validated(tmp_path):
    torch = pytest.importorskip("torch")
    p2l = torch.arange(8).repeat(2, 1)
    good_ids = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 0]]])  # [H=2, T=2, k=2]
    cases = {
        "records_not_list": ({"records": 5, "last_physical_to_logical_map": p2l},
                             "not a list"),
        "float_ids": ({"records": [{"topk_ids_of_layer": good_ids.float()}],
                       "last_physical_to_logical_map": p2l}, "not integers"),
        "bad_slot": ({"records": [{"topk_ids_of_layer": good_ids * 10}],
                      "last_physical_to_logical_map": p2l}, "physical id 70"),
        "below_minus_one": ({"records": [{"topk_ids_of_layer": good_ids - 5}],
                             "last_physical_to_logical_map": p2l}, "physical id -5"),
        "map_negative": ({"records": [{"topk_ids_of_layer": good_ids}],
                          "last_physical_to_logical_map": p2l - 3}, "outside"),
        "map_1d": ({"records": [], "last_physical_to_logical_map": torch.arange(8)},
                   "has 1 axes"),
        "count_negative": ({"logical_count": -torch.ones(2, 8, dtype=torch.int64)},
                           "negative count"),
        "count_string": ({"logical_count": "many"}, "logical_count"),
        "positions_short": ({"records": [{"topk_ids_of_layer": good_ids,
                                          "positions": torch.tensor([0])}],
                             "last_physical_to_logical_map": p2l}, "1 positions for 2"),
        "not_dict": ([1, 2, 3], "expected a dict"),
    }
    for name, (obj, needle) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        raises_input(lambda p=path: load_routing(p), needle)
        cli_fails(["analyze", path], needle)
    # A pickle that is not plain tensors/containers is refused by weights_only loading.
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil()))
    raises_input(lambda: load_routing(tmp_path / "evil.pt"), "not a readable torch file")
    cli_fails(["analyze", tmp_path / "evil.pt"], "not a readable torch file")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_without_torch_is_one_line(tmp_path, monkeypatch):
    import sys

    from moeplace.errors import MissingDependencyError

    (tmp_path / "d.pt").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(MissingDependencyError, match="needs torch"):
        load_routing(tmp_path / "d.pt")
    cli_fails(["analyze", tmp_path / "d.pt"], "needs torch")
