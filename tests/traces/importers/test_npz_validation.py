"""npz trace reader: every bad archive is one typed error / one CLI line, nothing is dropped
unless the file (or the caller) declares the lost-record marker, and every drop is counted."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest

from moeplace.traces import compute_stats, import_trace, read_trace
from moeplace.traces.importers import read_npz_trace
from tests.bad_input import cli_fails, peak_rss_mb, raises_input
from tests.conftest import MIXTRAL, shared_file


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _zip(path, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", method) as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return path


def _bomb(path):
    """A ~5 MB archive whose one member's header declares 4 GB of uint8 data (zeros compress
    over 200:1 at deflate's fastest level, which takes a third of the default's 6 CPU s):
    np.load would decompress it whole."""
    shape = (1 << 20, 64, 64)
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    h = repr(header).encode()
    h += b" " * (64 - (10 + len(h) + 1) % 64) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, \
            z.open("experts.npy", "w", force_zip64=True) as fh:
        fh.write(raw)
        zero = bytes(1 << 20)
        for _ in range(1024):  # 1 GiB of zeros declared and stored (compresses to ~1 MB)
            fh.write(zero)
    return path


def _bad_crc(path):
    good = io.BytesIO()
    np.savez(good, experts=np.arange(24, dtype=np.uint8).reshape(4, 3, 2))
    raw = bytearray(good.getvalue())
    i = raw.index(b"NUMPY") + 200 if len(raw) > 400 else raw.rindex(b"PK\x01\x02") - 5
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


CASES = [
    # name, builder(tmp_path) -> path, extra kwargs, needle, field
    ("not a zip", lambda d: (d / "a.npz").write_bytes(b"hello") and d / "a.npz", {},
     "not a readable .npz archive", "file"),
    ("no experts", lambda d: _zip(d / "a.npz", {"other.npy": _npy(np.zeros(3))}), {},
     "array missing", "experts"),
    ("object array", lambda d: _zip(d / "a.npz", {"experts.npy": _npy(
        np.array([[1, "x"]], dtype=object))}), {}, "Python objects", "experts"),
    ("float ids", lambda d: _zip(d / "a.npz", {"experts.npy": _npy(np.zeros((3, 2, 2)))}), {},
     "not an integer type", "experts"),
    ("zero layers", lambda d: _zip(d / "a.npz", {"experts.npy": _npy(
        np.zeros((3, 0, 2), np.uint8))}), {}, "no layers", "experts"),
    ("1-d experts", lambda d: _zip(d / "a.npz", {"experts.npy": _npy(np.zeros(3, np.uint8))}),
     {}, "is not [tokens, layers, k]", "experts"),
    ("num_experts string", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "num_experts.npy": _npy(np.array("eight"))}), {}, "is not one integer", "num_experts"),
    ("num_experts NaN", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "num_experts.npy": _npy(np.array(np.nan))}), {}, "is not one integer", "num_experts"),
    ("num_experts array", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "num_experts.npy": _npy(np.array([4, 4]))}), {}, "is not one integer", "num_experts"),
    ("num_experts zero", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "num_experts.npy": _npy(np.array(0))}), {}, "below 1", "num_experts"),
    ("num_experts huge", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "num_experts.npy": _npy(np.array(2**62))}), {}, "is above", "num_experts"),
    ("id above declared", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.full((3, 2, 2), 9, np.uint8)),
        "num_experts.npy": _npy(np.array(8))}), {}, "expert id 9 >= num_experts=8", "experts"),
    ("missing_id valid expert", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "num_experts.npy": _npy(np.array(8)), "missing_id.npy": _npy(np.array(3))}), {},
     "is a valid expert id", "missing_id"),
    ("argument disagrees with file", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "num_experts.npy": _npy(np.array(8))}), {"num_experts": 16}, "the file says 8",
     "num_experts"),
    ("layer ids wrong count", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "moe_layer_ids.npy": _npy(np.array([1, 2, 3]))}), {}, "3 ids for 2 layers",
     "moe_layer_ids"),
    ("layer ids repeated", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "moe_layer_ids.npy": _npy(np.array([1, 1]))}), {}, "appears twice", "moe_layer_ids"),
    ("weights wrong shape", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "weights.npy": _npy(np.zeros((3, 2), np.float32))}), {}, "expected (3, 2, 2)",
     "weights"),
    ("per-token field wrong length", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((3, 2, 2), np.uint8)),
        "prompt_id.npy": _npy(np.zeros(5, np.int32))}), {}, "expected (3,)", "prompt_id"),
    ("header declares more than stored", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.zeros((300, 2, 2), np.uint8))[:-100]}), {},
     "its header declares", "experts"),
    ("bad CRC", lambda d: _bad_crc(d / "a.npz"), {}, "a.npz", None),
    ("every token lost", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.full((3, 2, 2), 255, np.uint8)),
        "missing_id.npy": _npy(np.array(255))}), {}, "every token has a lost record", "experts"),
    ("undeclared marker", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.array([[[0, 1], [2, 255]], [[3, 4], [5, 6]]], np.uint8))}), {},
     "--missing-id 255", "experts"),
    ("implausible id", lambda d: _zip(d / "a.npz", {
        "experts.npy": _npy(np.full((2, 1, 1), 2**40, np.int64))}), {}, "implausibly large",
     "experts"),
]


@pytest.mark.parametrize("name,build,kw,needle,field", CASES, ids=[c[0] for c in CASES])
def test_bad_npz_is_one_typed_error(tmp_path, name, build, kw, needle, field):
    path = build(tmp_path)
    raises_input(lambda: read_npz_trace(path, **kw), needle, field)
    args = ["analyze", path] + [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}",
                                                                    str(v))]
    cli_fails(args, needle if field != "file" else "a.npz")


def test_zip_bomb_refused_before_decompressing(tmp_path):
    path = _bomb(tmp_path / "bomb.npz")
    assert path.stat().st_size < 10 << 20
    before = peak_rss_mb()
    raises_input(lambda: read_npz_trace(path), "memory cap", "experts")
    cli_fails(["analyze", path], "memory cap")
    cli_fails(["convert", path, tmp_path / "o.parquet"], "memory cap")
    assert peak_rss_mb() - before < 200
    assert not (tmp_path / "o.parquet").exists()


def test_uint8_256_experts_keeps_every_token(tmp_path, rng):
    """The acceptance case: a 256-expert model stored as uint8 uses 255 for a real expert."""
    T, L, k, N = 3000, 6, 8, 256
    e = np.argsort(rng.random((T, L, N), dtype=np.float32), axis=2)[:, :, :k].astype(np.uint8)
    assert (e == 255).any(axis=(1, 2)).sum() > T // 10  # the old reader dropped all these
    np.savez(tmp_path / "u8.npz", experts=e)
    tr = import_trace(tmp_path / "u8.npz")
    assert tr.num_tokens == T and tr.num_experts == N and tr.dropped_tokens == 0
    np.testing.assert_array_equal(tr.experts, e)
    st = compute_stats(tr)
    np.testing.assert_array_equal(st.load.sum(axis=1), np.full(L, T * k))
    assert st.load[:, 255].sum() == (e == 255).sum()
    from click.testing import CliRunner

    from moeplace.cli import main

    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "u8.npz"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["tokens"] == T and d["dropped_tokens"] == 0 and d["num_experts"] == N
    assert r.stderr == ""


def test_declared_missing_id_drops_and_counts(tmp_path, rng):
    e = rng.integers(0, 8, (50, 3, 2)).astype(np.uint8)
    lost_rows = [3, 17, 40]
    e[lost_rows, 1, 0] = 255
    np.savez(tmp_path / "m.npz", experts=e, missing_id=np.uint8(255), num_experts=np.int64(8),
             prompt_id=np.arange(50, dtype=np.int32))
    tr = import_trace(tmp_path / "m.npz")
    keep = np.setdiff1d(np.arange(50), lost_rows)
    np.testing.assert_array_equal(tr.experts, e[keep])
    np.testing.assert_array_equal(tr.tokens["request"], keep)
    assert tr.dropped_tokens == 3 and compute_stats(tr).dropped_tokens == 3
    from click.testing import CliRunner

    from moeplace.cli import main

    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "m.npz"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["dropped_tokens"] == 3
    assert r.stderr.count("\n") == 1 and "dropped 3 tokens" in r.stderr
    # convert keeps the count in the Parquet header, and analyze reports it from there.
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "m.npz"), str(tmp_path / "m.parquet")])
    assert r.exit_code == 0 and "dropped 3 tokens" in r.stdout
    assert read_trace(tmp_path / "m.parquet").dropped_tokens == 3
    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "m.parquet"), "--json"])
    assert json.loads(r.stdout)["dropped_tokens"] == 3 and "dropped 3" in r.stderr
    # stats files carry it too.
    r = CliRunner().invoke(main, ["stats", str(tmp_path / "m.npz"), "--out",
                                  str(tmp_path / "s.npz")])
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "s.npz"), "--json"])
    assert json.loads(r.stdout)["dropped_tokens"] == 3


def test_mixtral_marker_only_when_declared():
    path = shared_file(MIXTRAL)
    raw = np.load(path)["experts"]
    lost = int((raw == 255).any(axis=(1, 2)).sum())
    cli_fails(["analyze", path], "--missing-id 255")
    tr = import_trace(path, missing_id=255)
    assert tr.num_tokens + tr.dropped_tokens == raw.shape[0] and tr.dropped_tokens == lost
    # Declaring 256 experts instead keeps 255 as an expert: nothing is dropped.
    assert import_trace(path, num_experts=256).num_tokens == raw.shape[0]


def test_missing_id_flag_through_cli(tmp_path):
    e = np.array([[[0, 1]], [[2, 255]], [[3, 4]]], np.uint8)
    np.savez(tmp_path / "f.npz", experts=e)
    from click.testing import CliRunner

    from moeplace.cli import main

    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "f.npz"), "--missing-id", "255"])
    assert r.exit_code == 0 and "2 tokens" in r.stdout and "dropped 1 tokens" in r.stderr


def test_crc_error_is_typed(tmp_path):
    # A corrupted member fails its CRC (or inflate) check while being read: InputError.
    raw = _npy(np.arange(4000, dtype=np.uint16).reshape(1000, 2, 2) % 7)
    path = _zip(tmp_path / "c.npz", {"experts.npy": raw}, zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    data[200] ^= 0x55
    path.write_bytes(bytes(data))
    assert zlib.crc32(raw) != 0
    raises_input(lambda: read_npz_trace(path), "c.npz")
