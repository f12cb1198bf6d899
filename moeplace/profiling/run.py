"""Run a local transformers model over a prompt file (prefill and greedy generation) while
recording its routing to a trace: what ``moeplace profile`` does."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from moeplace._progress import Progress
from moeplace._validate import loads_json
from moeplace.errors import InputError, MissingDependencyError
from moeplace.profiling.recorder import Recorder, record

DTYPES = ("auto", "float32", "bfloat16", "float16")


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from ``.txt`` (one per non-empty line) or ``.jsonl`` (a string, or an object with
    ``prompt`` or ``text``, per line)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "prompts", "file not found", "pass a .txt or .jsonl prompt file")
    prompts: list[str] = []
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(p, "prompts", f"cannot read ({exc.strerror or exc})",
                         "check the path") from None
    except UnicodeDecodeError as exc:
        raise InputError(p, "prompts", f"not UTF-8 text (bad byte at offset {exc.start})",
                         "save the prompt file as UTF-8") from None
    # Universal newlines, as text-mode reading splits (not str.splitlines: a prompt may hold
    # form feeds or U+2028).
    for i, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            prompts.append(line)
            continue
        obj = loads_json(line, p, f"line {i}", "one JSON value per line")
        text_i = obj if isinstance(obj, str) else (
            obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None)
        if not isinstance(text_i, str):
            raise InputError(p, f"line {i}", "no 'prompt' or 'text' string",
                             'write {"prompt": "..."} or a JSON string per line')
        prompts.append(text_i)
    if not prompts:
        raise InputError(p, "prompts", "the file holds no prompt", "add one prompt per line")
    return prompts


def load_local_model(model_dir: str | os.PathLike[str], dtype: str = "auto",
                     device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory; never downloads (offline mode is forced)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise MissingDependencyError("torch and transformers", "moeplace profile", "torch") from None
    if not sys.stderr.isatty():  # progress bars only on a terminal, transformers' too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise InputError(d, "config.json", "not a model directory",
                         "pass a local directory written by save_pretrained (no Hub ids)")
    if dtype not in DTYPES:
        raise InputError("--dtype", dtype, "unknown dtype", f"use one of {DTYPES}")
    check_model_config(d / "config.json")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    with _quiet_transformers():
        return _load_checked(d, dtype, dev, torch, AutoModelForCausalLM, AutoTokenizer)


# Integer fields transformers reads from config.json for the MoE models moeplace records; a wrong
# type there surfaces as a TypeError deep inside a model's __init__, so it is checked first.
_INT_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size",
             "num_attention_heads", "num_key_value_heads", "vocab_size", "num_experts",
             "num_local_experts", "n_routed_experts", "num_experts_per_tok", "n_group",
             "topk_group", "n_shared_experts", "first_k_dense_replace")
_MAX_CONFIG_BYTES = 16 << 20


def check_model_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, checked before transformers sees it: a JSON object, a
    ``model_type`` transformers knows, and the MoE shape fields as positive integers. Every
    problem is one ``InputError`` naming the field."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise InputError(path, "file", f"over {_MAX_CONFIG_BYTES >> 20} MiB, not a model config",
                         "point --model at a directory written by save_pretrained")
    cfg = loads_json(path.read_bytes(), path, "file", "write config.json with save_pretrained")
    if not isinstance(cfg, dict):
        raise InputError(path, "file", f"a JSON {type(cfg).__name__}, not an object",
                         "config.json must be one JSON object, as save_pretrained writes it")
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise InputError(path, "model_type", "missing or not a string",
                         "set model_type (e.g. \"qwen3_moe\", \"mixtral\")")
    if mt not in CONFIG_MAPPING_NAMES:
        raise InputError(path, "model_type", f"{mt!r} is not a model type this transformers "
                         "knows", "check the spelling, or upgrade transformers")
    for key in _INT_KEYS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise InputError(path, key, f"{v!r} is not a non-negative integer",
                             "fix the value in config.json")
    return cfg


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


class _quiet_transformers:
    """Silence transformers' logging and Python warnings while loading, so that a bad directory
    reads as moeplace's one error line and a good one prints nothing of theirs."""

    def __enter__(self) -> None:
        import warnings

        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        self._warnings.__exit__(*exc)
        hf_logging.set_verbosity(self._level)


def _load_checked(d: Path, dtype: str, dev: str, torch: Any, AutoModelForCausalLM: Any,
                  AutoTokenizer: Any) -> tuple[Any, Any]:
    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as exc:  # any loader failure is the directory's fault: one line, no trace
        raise InputError(d, "tokenizer", f"cannot load ({_first_line(exc)})",
                         "the directory needs its tokenizer files") from None
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype != "auto":
        kw["dtype"] = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, **kw).to(dev).eval()
    except Exception as exc:  # TypeError/KeyError from a model's __init__ too: one line
        raise InputError(d, "model", f"cannot load ({_first_line(exc)})",
                         "check the directory's weights and config") from None
    tok.padding_side = "left"  # generate() needs prompts aligned on the right
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError(d, "tokenizer", "has neither a pad nor an eos token",
                             "set pad_token in tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return model, tok


def profile(model_dir: str | os.PathLike[str], prompts: list[str], out: str | os.PathLike[str],
            *, max_new_tokens: int = 32, batch_size: int = 8, dtype: str = "auto",
            device: str = "auto", weights: bool = False,
            show_progress: bool | None = None) -> Recorder:
    """Prefill and greedily continue every prompt (request id = its index), streaming the
    routing to ``out``; returns the finished recorder."""
    import torch

    if max_new_tokens < 0 or batch_size < 1:
        raise InputError("profile", "--max-new-tokens" if max_new_tokens < 0 else "--batch-size",
                         "must be >= 0 (tokens) and >= 1 (batch)", "give a valid count")
    model, tok = load_local_model(model_dir, dtype, device)
    dev = next(model.parameters()).device
    bar = Progress(len(prompts), "profiling", "prompts", enabled=show_progress)
    try:
        with torch.no_grad(), record(model, out=out, weights=weights) as rec:
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                enc = tok(batch, return_tensors="pt", padding=True).to(dev)
                rec.set_request_ids(range(start, start + len(batch)))
                if max_new_tokens == 0:
                    model(**enc)
                else:
                    model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
                bar.update(len(batch))
    finally:
        bar.close()
    return rec
