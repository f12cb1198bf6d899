"""Prompt files for `moeplace profile`: unreadable, non-UTF-8 or malformed ones are one line."""

from __future__ import annotations

import pytest

from moeplace.profiling.run import read_prompts
from tests.bad_input import cli_fails, raises_input

CASES = [
    ("p.txt", b"hello\n\xff\xfe world\n", "not UTF-8 text (bad byte at offset 6)"),
    ("p.jsonl", b'{"prompt": "a\xc3"}\n', "not UTF-8"),
    ("p.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    ("p.jsonl", b'{"prompt": 5}\n', "no 'prompt' or 'text' string"),
    ("p.jsonl", b"{nope}\n", "not valid JSON"),
    ("p.txt", b"\n \n", "holds no prompt"),
]


@pytest.mark.parametrize("name,raw,needle", CASES, ids=[c[2][:20] for c in CASES])
def test_bad_prompt_files(tmp_path, name, raw, needle):
    path = tmp_path / name
    path.write_bytes(raw)
    raises_input(lambda: read_prompts(path), needle)
    (tmp_path / "model").mkdir(exist_ok=True)
    cli_fails(["profile", "--model", tmp_path / "model", "--prompts", path, "--out",
               tmp_path / "t.parquet"], needle)
    assert not (tmp_path / "t.parquet").exists()


def test_good_prompts_keep_their_text(tmp_path):
    (tmp_path / "p.txt").write_bytes("héllo\r\nsecond\x0cpart\n\nthird\rfourth\n".encode())
    assert read_prompts(tmp_path / "p.txt") == ["héllo", "second\x0cpart", "third", "fourth"]
    (tmp_path / "p.jsonl").write_text('"a"\n{"text": "b"}\n{"prompt": "c"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b", "c"]
