"""Checks every reader shares: JSON parsed without RecursionError, values of the declared type and
range, and npz members sized from the zip directory before a byte is decompressed.

Every failure is an ``InputError`` naming the source, the field and the fix, so the CLI prints
one line; nothing here trusts a value before its type and range are known.
"""

from __future__ import annotations

import json
import math
import os
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from moeplace._limits import check_memory
from moeplace.errors import InputError

# Far above any real model (Kimi-K2: 384 experts, 61 layers) and far below anything that
# overflows an int64 product; the memory check refuses sizes that fit these but not in RAM.
MAX_EXPERTS = 1 << 20
MAX_LAYERS = 1 << 16
MAX_TOP_K = 1 << 10
MAX_GPUS = 1 << 20


def loads_json(raw: str | bytes, source: object, field: str = "file", fix: str = "") -> Any:
    """``json.loads`` whose every failure (syntax, deep nesting, huge integer literal, bad UTF-8)
    is one ``InputError``."""
    fix = fix or "give a valid JSON file"
    try:
        return json.loads(raw)
    except RecursionError:
        raise InputError(source, field, "JSON nested too deeply to parse", fix) from None
    except UnicodeDecodeError:
        raise InputError(source, field, "not UTF-8 text", fix) from None
    except ValueError as exc:  # JSONDecodeError, and int literals over 4300 digits
        raise InputError(source, field, f"not valid JSON ({str(exc)[:120]})", fix) from None


def read_json(path: str | os.PathLike[str], field: str = "file", fix: str = "",
              max_bytes: int = 256 << 20) -> Any:
    """Parse a JSON file, refusing unreadable, oversized, non-UTF-8 or too deeply nested ones."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise InputError(p, field, f"{size} bytes is larger than a JSON file of this kind "
                             f"can be ({max_bytes})", fix or "check the path")
        raw = p.read_bytes()
    except IsADirectoryError:
        raise InputError(p, field, "is a directory", "pass a file") from None
    except OSError as exc:
        raise InputError(p, field, f"cannot read ({exc.strerror or exc})",
                         "check the path") from None
    return loads_json(raw, p, field, fix)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def as_int(value: Any, source: object, field: str, *, lo: int | None = None,
           hi: int | None = None, fix: str = "") -> int:
    """An integer (not a bool, not a float, not a string) within ``lo..hi``."""
    if isinstance(value, (np.integer,)):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(source, field, f"{value!r:.60} ({type_name(value)}) is not an integer",
                         fix or "write a whole number")
    if lo is not None and value < lo:
        raise InputError(source, field, f"{value} is below {lo}", fix or f"give a value >= {lo}")
    if hi is not None and value > hi:
        raise InputError(source, field, f"{value} is above {hi}", fix or f"give a value <= {hi}")
    return value


def as_finite(value: Any, source: object, field: str, fix: str = "") -> float:
    """A finite real number (int or float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(source, field, f"{value!r:.60} ({type_name(value)}) is not a number",
                         fix or "write a number")
    f = float(value)
    if not math.isfinite(f):
        raise InputError(source, field, f"{value} is not finite", fix or "write a finite number")
    return f


def as_int_list(value: Any, source: object, field: str, *, lo: int | None = 0,
                hi: int | None = None, distinct: bool = False, max_len: int = MAX_LAYERS,
                fix: str = "") -> list[int]:
    """A JSON list of integers in ``lo..hi`` (optionally all different)."""
    if not isinstance(value, (list, tuple)):
        raise InputError(source, field, f"{type_name(value)} is not a list of integers",
                         fix or "write a JSON list of integers")
    if len(value) > max_len:
        raise InputError(source, field, f"{len(value)} entries, more than {max_len}",
                         fix or "check the list")
    out = [as_int(v, source, f"{field}[{i}]", lo=lo, hi=hi, fix=fix) for i, v in enumerate(value)]
    if distinct and len(set(out)) != len(out):
        dup = next(x for i, x in enumerate(out) if x in out[:i])
        raise InputError(source, field, f"{dup} appears twice", fix or "list each id once")
    return out


def int_array(value: Any, source: object, field: str) -> np.ndarray:
    """An integer numpy array from a JSON list/array (no object dtype, no floats, no bools).

    A value outside int64 (e.g. 2**70) is refused rather than wrapped or turned into an object.
    """
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError, RecursionError) as exc:
        raise InputError(source, field, f"not a rectangular integer array ({str(exc)[:80]})",
                         "give a list of equal-length integer lists") from None
    if arr.dtype == object:
        raise InputError(source, field, "ragged, or an integer outside the 64-bit range",
                         "give a list of equal-length lists of ids")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > np.iinfo(np.int64).max:
        raise InputError(source, field, f"id {int(arr.max())} is outside the 64-bit signed range",
                         "ids must be small non-negative integers")
    if arr.dtype.kind == "f" and not isinstance(value, np.ndarray):
        # numpy turns a list mixing ints with one beyond int64 into floats: say which it is.
        try:
            np.asarray(value, dtype=np.int64)
        except OverflowError:
            raise InputError(source, field, "an integer outside the 64-bit signed range",
                             "ids must be small non-negative integers") from None
        except (ValueError, TypeError):
            pass
    if arr.dtype.kind not in "iu":
        raise InputError(source, field, f"values of type {arr.dtype} are not integers",
                         "ids must be integers")
    return arr.astype(np.int64, copy=False)


# ---- npz archives ---------------------------------------------------------------------------
# What a corrupt member can raise while its header is parsed (numpy tokenizes the header dict)
# or its data inflated (zlib, CRC, unsupported zip features; RuntimeError: an encrypted member).
_ARCHIVE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile,
                   SyntaxError, RecursionError, tokenize.TokenError, zlib.error,
                   NotImplementedError, MemoryError, RuntimeError)


class NpzMembers:
    """An ``.npz`` opened through its zip directory: member names, declared shapes and dtypes from
    each ``.npy`` header, and sizes checked against the memory cap before a member is read.

    ``np.load`` alone trusts a member's header and decompresses it whole; a 2 MB archive can
    declare gigabytes. Reading goes through ``read(name)``, which checks the declared size,
    refuses object (pickle) arrays and turns a bad CRC or truncated member into ``InputError``.
    """

    def __init__(self, path: str | os.PathLike[str], fix: str = "check the path") -> None:
        self.path = Path(path)
        self.fix = fix
        try:
            self._zip = zipfile.ZipFile(self.path)
            infos = self._zip.infolist()
        except _ARCHIVE_ERRORS as exc:
            raise InputError(self.path, "file", f"not a readable .npz archive ({str(exc)[:120]})",
                             fix) from None
        self._info = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i
                      for i in infos}
        self.headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._data_start: dict[str, int] = {}

    @property
    def files(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzMembers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) the member's ``.npy`` header declares, read without its data."""
        if name in self.headers:
            return self.headers[name]
        info = self._info[name]
        try:
            with self._zip.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version in ((2, 0), (3, 0)):
                    shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                self._data_start[name] = fh.tell()
        except _ARCHIVE_ERRORS as exc:
            raise InputError(self.path, name, f"not a readable .npy member ({str(exc)[:120]})",
                             self.fix) from None
        if dtype.hasobject:
            raise InputError(self.path, name, "holds Python objects (pickle), which are not "
                             "read", "store plain numeric arrays")
        self.headers[name] = (tuple(int(s) for s in shape), dtype)
        return self.headers[name]

    def nbytes(self, name: str) -> int:
        shape, dtype = self.header(name)
        return int(np.prod(shape, dtype=object)) * dtype.itemsize

    def read(self, name: str) -> np.ndarray:
        """The member as an array, after checking its declared and stored sizes."""
        if name not in self._info:
            raise InputError(self.path, name, "array missing", self.fix)
        nbytes = self.nbytes(name)
        check_memory(nbytes, f"array {name} {self.header(name)[0]}", self.path, name)
        info = self._info[name]
        # The zip directory's uncompressed size bounds what decompression can produce.
        check_memory(info.file_size, f"member {name}", self.path, name)
        stored = info.file_size - self._data_start[name]
        if stored < nbytes:
            raise InputError(self.path, name, f"member holds {stored} bytes of data, its header "
                             f"declares {nbytes}", "the archive is truncated or corrupt")
        try:
            with self._zip.open(info) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        except _ARCHIVE_ERRORS as exc:
            raise InputError(self.path, name, f"cannot read ({str(exc)[:120]})",
                             "the archive is corrupt; re-export it") from None

    def scalar_int(self, name: str, lo: int, hi: int) -> int:
        """A member that must hold one integer (e.g. ``num_experts``) within ``lo..hi``."""
        a = self.read(name)
        if a.size != 1 or a.dtype.kind not in "iu":
            raise InputError(self.path, name, f"{a.dtype} array of shape {a.shape} is not one "
                             "integer", "store it as a single integer")
        return as_int(int(a.reshape(-1)[0]), self.path, name, lo=lo, hi=hi)
