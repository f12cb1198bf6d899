"""`moeplace profile` end to end on a tiny model directory with its own tokenizer (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.traces import read_trace
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL
from tests.tiny_models import VOCAB, build

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-qwen3-moe")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(d)
    model, _ = build("qwen3-moe")
    model.save_pretrained(d)
    return d


PROMPTS = ["w1 w2 w3 w4 w5", "w7 w8", "w9 w10 w11 w12", "w3"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_profile_writes_a_trace_with_request_position_phase(model_dir, tmp_path, suffix):
    prompts = tmp_path / f"prompts{suffix}"
    lines = PROMPTS if suffix == ".txt" else [json.dumps({"prompt": p}) for p in PROMPTS]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "trace.parquet"
    res = CliRunner().invoke(main, ["profile", "--model", str(model_dir), "--prompts",
                                    str(prompts), "--out", str(out), "--max-new-tokens", "3",
                                    "--batch-size", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "expert_load_ratio" in res.output
    tr = read_trace(out)
    assert tr.meta.top_k == 2 and tr.meta.num_experts == 8 and tr.meta.moe_layer_ids == (0, 1, 2)
    t = tr.tokens
    assert sorted(set(t["request"].tolist())) == [0, 1, 2, 3]
    for r, p in enumerate(PROMPTS):
        sel = t["request"] == r
        n = len(p.split())
        np.testing.assert_array_equal(t["phase"][sel], [PHASE_PREFILL] * n + [PHASE_DECODE] * 2)
        np.testing.assert_array_equal(t["position"][sel], np.arange(n + 2))
    # two batches (3 + 1 prompts): each a prefill step then two decode steps
    assert len(set(t["step"].tolist())) == 6


def test_profile_bad_input_is_one_line_exit_2(model_dir, tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("w1 w2\n")
    cases = [
        (["--model", str(tmp_path / "missing"), "--prompts", str(good)], "config.json"),
        (["--model", str(model_dir), "--prompts", str(tmp_path / "none.txt")], "file not found"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases.append((["--model", str(model_dir), "--prompts", str(empty)], "no prompt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1"}\n{"nope": 1}\n')
    cases.append((["--model", str(model_dir), "--prompts", str(bad)], "line 2"))
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"t{i}.parquet"
        res = CliRunner().invoke(main, ["profile", *args, "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not out.exists()


def _copy_model(src, dst, config):
    import shutil

    shutil.copytree(src, dst)
    (dst / "config.json").write_bytes(config if isinstance(config, bytes) else
                                      json.dumps(config).encode())
    return dst


def test_bad_config_json_is_one_stderr_line(model_dir, tmp_path):
    # A real process, so that transformers' own logging and warnings (which write to the
    # process's stderr, not click's) would show if they leaked before moeplace's line.
    import subprocess
    import sys

    good = json.loads((model_dir / "config.json").read_text())
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2\n")
    cases = {
        "list": ([good], "not an object"),
        "bytes": (b"\xff\xfe{", "UTF-8"),
        "type": ({**good, "model_type": "no_such_moe"}, "model_type"),
        "missing-type": ({k: v for k, v in good.items() if k != "model_type"}, "model_type"),
        "layers": ({**good, "num_hidden_layers": "three"}, "num_hidden_layers"),
        "experts": ({**good, "num_experts": 2.5}, "num_experts"),
        "topk": ({**good, "num_experts_per_tok": True}, "num_experts_per_tok"),
    }
    for name, (config, needle) in cases.items():
        d = _copy_model(model_dir, tmp_path / name, config)
        out = tmp_path / f"{name}.parquet"
        res = subprocess.run([sys.executable, "-m", "moeplace.cli", "profile", "--model", str(d),
                              "--prompts", str(prompts), "--out", str(out)],
                             capture_output=True, text=True, timeout=600)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (name, res.stderr)
        assert len(lines) == 1 and needle in lines[0] and "config.json" in lines[0], (name, lines)
        assert "Traceback" not in res.stderr and not out.exists()
