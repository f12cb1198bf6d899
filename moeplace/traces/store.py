"""Parquet storage of routing traces: a streaming, sharded writer and a chunked, bounded-memory reader.

Layout (format version 1): one row per token. ``experts`` is a fixed-size binary cell holding the
token's ``[L, k]`` ids row-major in the little-endian dtype named in the metadata; ``weights``
(optional) likewise holds float32 ``[L, k]``; ``request``, ``position``, ``phase``, ``step`` are
optional integer columns. The schema metadata key ``moeplace`` holds the JSON header (format,
version, dtype, TraceMeta). A trace is one ``.parquet`` file or a directory of ``part-*.parquet``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeplace._fileio import atomic_path
from moeplace._limits import check_memory
from moeplace._validate import as_int, loads_json, type_name
from moeplace.errors import InputError
from moeplace.traces.trace import TOKEN_FIELDS, Trace, TraceMeta, expert_dtype

FORMAT = "moeplace.trace"
VERSION = 1
META_KEY = b"moeplace"
DEFAULT_CHUNK = 1 << 16


def _header(meta: TraceMeta, has_weights: bool) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "experts_dtype": expert_dtype(meta.num_experts).str.lstrip("<|>"),
        "has_weights": has_weights,
        "meta": meta.to_dict(),
    }


def _schema(meta: TraceMeta, has_weights: bool, token_fields: list[str]) -> pa.Schema:
    L, k = meta.num_layers, meta.top_k
    itemsize = expert_dtype(meta.num_experts).itemsize
    fields = [pa.field("experts", pa.binary(L * k * itemsize), nullable=False)]
    if has_weights:
        fields.append(pa.field("weights", pa.binary(L * k * 4), nullable=False))
    for name in token_fields:
        fields.append(pa.field(name, pa.from_numpy_dtype(TOKEN_FIELDS[name]), nullable=False))
    header = json.dumps(_header(meta, has_weights), sort_keys=True).encode()
    return pa.schema(fields, metadata={META_KEY: header})


def _fixed_binary(arr: np.ndarray, width: int) -> pa.Array:
    flat = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), arr.shape[0], [None, pa.py_buffer(flat)]
    )


def _to_batch(trace: Trace, schema: pa.Schema) -> pa.RecordBatch:
    _T, L, k = trace.experts.shape
    e = trace.experts.astype(trace.experts.dtype.newbyteorder("<"), copy=False)
    cols: list[pa.Array] = [_fixed_binary(e, L * k * e.dtype.itemsize)]
    names = schema.names
    if "weights" in names:
        w = trace.weights.astype("<f4", copy=False)  # type: ignore[union-attr]
        cols.append(_fixed_binary(w, L * k * 4))
    for name in names[len(cols):]:
        cols.append(pa.array(trace.tokens[name]))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class TraceWriter:
    """Stream ``Trace`` chunks into Parquet; nothing appears at ``path`` until ``close()`` succeeds.

    ``path`` ending in ``.parquet`` gives one file (one row group per ``row_group_tokens``);
    any other path gives a directory of shards of at most ``shard_tokens`` tokens each.
    Use as a context manager: an exception inside the block discards everything written.
    """

    def __init__(self, path: str | os.PathLike[str], meta: TraceMeta, *,
                 with_weights: bool = False, token_fields: list[str] | None = None,
                 shard_tokens: int = 1 << 22, row_group_tokens: int = 1 << 17,
                 compression: str = "zstd") -> None:
        self.path = Path(path)
        self.meta = meta
        self.schema = _schema(meta, with_weights, sorted(token_fields or []))
        self.sharded = self.path.suffix != ".parquet"
        self.shard_tokens = shard_tokens
        self.row_group_tokens = row_group_tokens
        self.compression = compression
        self.num_tokens = 0
        self._ctx = atomic_path(self.path, directory=self.sharded)
        self._tmp = self._ctx.__enter__()
        if self.sharded:
            self._tmp.mkdir()
        self._writer: pq.ParquetWriter | None = None
        self._shard = 0
        self._in_shard = 0
        self._closed = False

    def _open_next(self) -> pq.ParquetWriter:
        if self._writer is not None:
            self._writer.close()
        target = self._tmp / f"part-{self._shard:05d}.parquet" if self.sharded else self._tmp
        self._shard += 1
        self._in_shard = 0
        self._writer = pq.ParquetWriter(target, self.schema, compression=self.compression)
        return self._writer

    def write(self, trace: Trace) -> None:
        """Append a chunk of tokens (same model, same optional fields as the writer)."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self.meta.require_same_model(trace.meta, self.path, "write chunks")
        if ("weights" in self.schema.names) != (trace.weights is not None):
            raise InputError(self.path, "weights", "chunks must all have or all lack weights",
                             "record weights for every chunk or none")
        missing = [n for n in self.schema.names if n in TOKEN_FIELDS and n not in trace.tokens]
        if missing:
            raise InputError(self.path, missing[0], "per-token field missing from a chunk",
                             "give every chunk the same per-token fields")
        start = 0
        while start < trace.num_tokens:
            if self._writer is None or (self.sharded and self._in_shard >= self.shard_tokens):
                self._open_next()
            room = self.shard_tokens - self._in_shard if self.sharded else trace.num_tokens
            stop = min(trace.num_tokens, start + room)
            part = trace if (start, stop) == (0, trace.num_tokens) else trace.select(
                slice(start, stop))
            batch = _to_batch(part, self.schema)
            assert self._writer is not None
            self._writer.write_batch(batch, row_group_size=self.row_group_tokens)
            self._in_shard += stop - start
            self.num_tokens += stop - start
            start = stop

    def close(self) -> None:
        """Finish the file(s) and move them into place atomically."""
        if self._closed:
            return
        self._closed = True
        if self.num_tokens == 0:
            self.abort()
            raise InputError(self.path, "experts", "the trace has no tokens",
                             "record or import at least one token")
        assert self._writer is not None
        self._writer.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_trace(trace: Trace, path: str | os.PathLike[str], **kw: Any) -> Path:
    """Write a whole in-memory trace to ``path`` (see ``TraceWriter``)."""
    with TraceWriter(path, trace.meta, with_weights=trace.weights is not None,
                     token_fields=list(trace.tokens), **kw) as w:
        w.write(trace)
    return Path(path)


_EXPERT_DTYPES = {"u1": "u1", "u2": "u2", "u4": "u4", "u8": "u8", "uint8": "u1",
                  "uint16": "u2", "uint32": "u4", "uint64": "u8"}
_MAX_HEADER = 16 << 20  # bytes: the header holds a TraceMeta, a few KB for any real model


def _parse_header(schema: pa.Schema, source: object) -> tuple[dict[str, Any], TraceMeta]:
    """The ``moeplace`` schema metadata, every field type- and range-checked, and the schema's
    columns checked against it (present, fixed width matching ``[L, k]`` of the dtype)."""
    fix = "re-create the file with moeplace convert"
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputError(source, "schema metadata", "not a moeplace trace (no 'moeplace' header)",
                         "import it with 'moeplace convert SRC DST.parquet'")
    if len(raw) > _MAX_HEADER:
        raise InputError(source, "schema metadata", f"header of {len(raw)} bytes is far larger "
                         "than a trace header can be", fix)
    header = loads_json(raw, source, "schema metadata", fix)
    if not isinstance(header, dict):
        raise InputError(source, "schema metadata", f"header is a JSON {type_name(header)}, "
                         "not an object", fix)
    if header.get("format") != FORMAT:
        raise InputError(source, "format", f"{header.get('format')!r:.60} is not {FORMAT!r}",
                         "import it with moeplace convert")
    version = as_int(header.get("version"), source, "version", lo=1, fix=fix)
    if version > VERSION:
        raise InputError(source, "version", f"format version {version} is newer "
                         f"than this moeplace understands ({VERSION})", "upgrade moeplace")
    meta = TraceMeta.from_dict(header.get("meta"), source)
    dt = header.get("experts_dtype")
    if not isinstance(dt, str) or dt not in _EXPERT_DTYPES:
        raise InputError(source, "experts_dtype", f"{dt!r:.40} is not one of uint8/16/32/64", fix)
    dtype = np.dtype(_EXPERT_DTYPES[dt]).newbyteorder("<")
    if meta.num_experts - 1 > np.iinfo(dtype).max:
        raise InputError(source, "experts_dtype", f"{dt} cannot hold expert ids up to "
                         f"{meta.num_experts - 1}", fix)
    has_w = header.get("has_weights", False)
    if not isinstance(has_w, bool):
        raise InputError(source, "has_weights", f"{has_w!r:.40} is not true/false", fix)
    L, k = meta.num_layers, meta.top_k
    widths = {"experts": L * k * dtype.itemsize, "weights": L * k * 4}
    names = schema.names
    if len(set(names)) != len(names):
        raise InputError(source, "columns", "a column name appears twice", fix)
    if "experts" not in names:
        raise InputError(source, "experts", "column missing", fix)
    if has_w != ("weights" in names):
        raise InputError(source, "weights", "the header and the columns disagree on whether "
                         "gate weights are stored", fix)
    for name in names:
        typ = schema.field(name).type
        if name in widths:
            if typ != pa.binary(widths[name]):
                raise InputError(source, name, f"column type {typ} does not match [{L}, {k}] "
                                 f"of {dtype if name == 'experts' else 'float32'} "
                                 f"(fixed_size_binary[{widths[name]}])", fix)
        elif name in TOKEN_FIELDS:
            if not pa.types.is_integer(typ):
                raise InputError(source, name, f"column type {typ} is not an integer", fix)
    header = {**header, "experts_dtype": dtype.str.lstrip("<|>")}
    return header, meta


class TraceReader:
    """Open a Parquet trace (file or shard directory) and read it as a stream of ``Trace`` chunks."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(self.path, "path", "no such file or directory", "check the path")
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.parquet"))
            if not self.files:
                raise InputError(self.path, "path", "directory holds no .parquet shards",
                                 "point at a trace file or a directory of part-*.parquet")
        else:
            self.files = [self.path]
        self._pfs: list[pq.ParquetFile] = []
        self.header: dict[str, Any] = {}
        for f in self.files:
            try:
                # A buffered stream without pre-buffering keeps memory at about one chunk;
                # the defaults read whole column chunks ahead and grew to the file's size.
                pf = pq.ParquetFile(f, buffer_size=1 << 22, pre_buffer=False)
                pf.schema_arrow  # noqa: B018  (decodes the footer's schema: may be corrupt)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise InputError(f, "file", f"not a readable Parquet file ({_first_line(exc)})",
                                 "the file may be truncated; re-create it") from None
            header, meta = _parse_header(pf.schema_arrow, f)
            if self._pfs and (meta.to_dict() != self.meta.to_dict() or header != self.header
                              or pf.schema_arrow.remove_metadata()
                              != self._pfs[0].schema_arrow.remove_metadata()):
                raise InputError(f, "meta", "shard header or columns differ from the first "
                                 "shard's", "keep shards of one trace in one directory")
            self.header, self.meta = header, meta
            self._pfs.append(pf)
        self.meta = self.meta.with_updates(source=str(self.path))
        names = self._pfs[0].schema_arrow.names
        self.has_weights = "weights" in names
        self.token_fields = [n for n in names if n in TOKEN_FIELDS]
        self.dtype = np.dtype(self.header["experts_dtype"]).newbyteorder("<")
        self.num_tokens = sum(pf.metadata.num_rows for pf in self._pfs)
        # A phase view (``only_phase``): the phase code kept, and its tokens per row group.
        self.phase: int | None = None
        self._phase_rows: dict[tuple[int, int], int] = {}

    def row_groups(self) -> list[tuple[int, int, int]]:
        """``(file index, row group index, tokens)`` of every row group, in trace order (of a
        phase view: the groups holding tokens of its phase, and how many)."""
        if self.phase is not None:
            return [(fi, g, n) for (fi, g), n in self._phase_rows.items()]
        return [(fi, g, pf.metadata.row_group(g).num_rows) for fi, pf in enumerate(self._pfs)
                for g in range(pf.metadata.num_row_groups)]

    def phase_counts(self) -> dict[tuple[int, int], np.ndarray]:
        """Tokens of each ``phase`` value per row group ``(file, group)``: an int64 array of
        256 counts indexed by value + 128 (values as the chunks' int8 ``phase`` holds them, so
        these counts are the view's tokens). One pass over the phase column only; an empty dict
        when the trace has no phase column."""
        if "phase" not in self.token_fields:
            return {}
        out: dict[tuple[int, int], np.ndarray] = {}
        for fi, (f, pf) in enumerate(zip(self.files, self._pfs, strict=True)):
            for g in range(pf.metadata.num_row_groups):
                c = np.zeros(256, np.int64)
                with _reading(f):
                    for b in pf.iter_batches(batch_size=1 << 20, columns=["phase"],
                                             row_groups=[g]):
                        if b.column(0).null_count:
                            raise InputError(f, "phase", "holds null values",
                                             "re-create the file")
                        v = _as_phase(b.column(0).to_numpy())
                        c += np.bincount(v.astype(np.int64) + 128, minlength=256)
                out[(fi, g)] = c
        return out

    def only_phase(self, phase: int,
                   counts: dict[tuple[int, int], np.ndarray] | None = None) -> TraceReader:
        """A view of this trace holding only the tokens whose ``phase`` column is ``phase``
        (``trace.PHASE_PREFILL``/``PHASE_DECODE``): every reader of it (chunks, row groups,
        ``num_tokens``, ``read``, ``iter_column``) sees those tokens alone, still streamed, and
        row groups without one are never read. ``counts``: ``phase_counts()`` if already
        taken. The trace must have a phase column."""
        import copy

        if "phase" not in self.token_fields:
            raise InputError(self.path, "phase", "the trace has no phase column",
                             "record the phase (moeplace profile does) or use every token")
        counts = self.phase_counts() if counts is None else counts
        view = copy.copy(self)
        view.phase = int(phase)
        view._phase_rows = {key: int(c[int(phase) + 128]) for key, c in counts.items()
                            if c[int(phase) + 128]}
        view.num_tokens = sum(view._phase_rows.values())
        return view

    def iter_chunks(self, chunk_tokens: int = DEFAULT_CHUNK, *, weights: bool = True,
                    token_fields: bool = True,
                    row_groups: set[tuple[int, int]] | None = None) -> Iterator[Trace]:
        """Yield consecutive chunks of at most ``chunk_tokens`` tokens, in file order;
        ``row_groups`` (``(file, group)`` pairs) reads only those, skipping the rest on disk."""
        cols = ["experts"]
        if weights and self.has_weights:
            cols.append("weights")
        if token_fields:
            cols += self.token_fields
        elif self.phase is not None:
            cols.append("phase")  # to select the view's tokens; dropped from the chunks
        if self.phase is not None:  # only the row groups holding the view's tokens
            keep = set(self._phase_rows)
            row_groups = keep if row_groups is None else keep & set(row_groups)
        L, k = self.meta.num_layers, self.meta.top_k
        if chunk_tokens < 1:
            raise InputError("chunk_tokens", "value", f"{chunk_tokens} is not positive",
                             "read at least one token per chunk")
        row = L * k * (self.dtype.itemsize + (4 if weights and self.has_weights else 0))
        # Declared widths drive every chunk's size: check one chunk against the cap first.
        check_memory(3 * row * min(chunk_tokens, max(self.num_tokens, 1)),
                     f"a chunk of {chunk_tokens} tokens x {L} layers x top-{k}", self.path, "meta")
        for fi, (f, pf) in enumerate(zip(self.files, self._pfs, strict=True)):
            groups = None
            if row_groups is not None:
                groups = [g for g in range(pf.metadata.num_row_groups) if (fi, g) in row_groups]
                if not groups:
                    continue
            with _reading(f):
                for batch in pf.iter_batches(batch_size=chunk_tokens, columns=cols,
                                             row_groups=groups):
                    chunk = self._decode(batch, L, k, f)
                    if self.phase is not None:
                        chunk = self._phase_only(chunk, token_fields)
                        if chunk is None:
                            continue
                    yield chunk

    def _phase_only(self, chunk: Trace, token_fields: bool) -> Trace | None:
        """The tokens of the view's phase in ``chunk`` (None when it holds none)."""
        mask = chunk.tokens["phase"] == self.phase
        if not mask.any():
            return None
        if not mask.all():
            chunk = chunk.select(mask)
        if not token_fields:
            chunk.tokens = {}
        return chunk

    def iter_column(self, name: str, chunk_tokens: int = 1 << 20) -> Iterator[np.ndarray]:
        """The values of one per-token column (``request``, ``position``, ``phase``,
        ``step``), chunk by chunk, reading that column alone (and ``phase`` in a phase view)."""
        if name not in self.token_fields:
            raise InputError(self.path, name, "column missing", "record this per-token field")
        cols = [name] if self.phase is None or name == "phase" else [name, "phase"]
        keep = None if self.phase is None else set(self._phase_rows)
        for fi, (f, pf) in enumerate(zip(self.files, self._pfs, strict=True)):
            groups = None if keep is None else [g for g in range(pf.metadata.num_row_groups)
                                                if (fi, g) in keep]
            if groups == []:
                continue
            with _reading(f):
                for b in pf.iter_batches(batch_size=chunk_tokens, columns=cols,
                                         row_groups=groups):
                    if any(b.column(i).null_count for i in range(b.num_columns)):
                        raise InputError(f, name, "holds null values", "re-create the file")
                    v = b.column(0).to_numpy()
                    if self.phase is not None:
                        v = v[_as_phase(b.column(len(cols) - 1).to_numpy()) == self.phase]
                    yield v

    def _decode(self, batch: pa.RecordBatch, L: int, k: int, source: Path) -> Trace:
        n = batch.num_rows
        e_col = batch.column("experts")
        width = L * k * self.dtype.itemsize
        if e_col.type != pa.binary(width):
            raise InputError(source, "experts", f"column type {e_col.type} does not match "
                             f"[{L}, {k}] of {self.dtype}", "re-create the file")
        for name in batch.schema.names:
            if batch.column(name).null_count:
                raise InputError(source, name, "holds null values", "re-create the file")
        # Ids are range-checked against num_experts for every chunk by Trace (vectorised).
        experts = _binary_to_numpy(e_col, self.dtype, n, L, k, source)
        weights = None
        if "weights" in batch.schema.names:
            weights = _binary_to_numpy(batch.column("weights"), np.dtype("<f4"), n, L, k, source)
        tokens = {name: batch.column(name).to_numpy() for name in batch.schema.names
                  if name in TOKEN_FIELDS}
        meta = self.meta.with_updates(source=str(source))
        return Trace(experts=experts, meta=meta, weights=weights, tokens=tokens)

    def read(self) -> Trace:
        """Load the whole trace into memory (after checking what its row count implies)."""
        L, k = self.meta.num_layers, self.meta.top_k
        row = L * k * (self.dtype.itemsize + (4 if self.has_weights else 0)) + 8 * len(
            self.token_fields)
        # Chunks and their concatenation are alive together: twice the trace.
        check_memory(2 * row * self.num_tokens, f"{self.num_tokens:,} tokens x {L} layers x "
                     f"top-{k} in memory", self.path, "num_rows")
        return Trace.concat(list(self.iter_chunks(chunk_tokens=1 << 20)))


def _binary_to_numpy(col: pa.Array, dtype: np.dtype, n: int, L: int, k: int,
                     source: object = "trace") -> np.ndarray:
    buf = col.buffers()[1]
    width = L * k * dtype.itemsize
    start = col.offset * width
    if buf is None or buf.size < start + n * width:
        raise InputError(source, "experts", "column data shorter than its rows say",
                         "the file is corrupt; re-create it")
    raw = np.frombuffer(buf, dtype=np.uint8, count=n * width, offset=start)
    return raw.view(dtype).reshape(n, L, k)


def _as_phase(values: np.ndarray) -> np.ndarray:
    """A phase column's values as a ``Trace`` holds them (``TOKEN_FIELDS``: int8)."""
    return values.astype(TOKEN_FIELDS["phase"], copy=False)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Reading ``path``'s row groups: pyarrow's errors on bad bytes become one InputError."""
    try:
        yield
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(path, "file", f"corrupt Parquet data ({_first_line(exc)})",
                         "the file may be truncated; re-create it") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Load a Parquet trace fully into memory."""
    return TraceReader(path).read()


def open_trace(path: str | os.PathLike[str]) -> TraceReader:
    """Open a Parquet trace for streaming."""
    return TraceReader(path)


def as_chunks(source: Trace | TraceReader | str | os.PathLike[str] | Iterable[Trace],
              chunk_tokens: int = DEFAULT_CHUNK, *, weights: bool = True,
              token_fields: bool = True) -> tuple[Iterator[Trace], TraceMeta, int | None]:
    """Any trace source (in memory, Parquet path or reader, iterable of chunks) as
    ``(chunks, meta, total tokens or None)``, streaming wherever the source allows."""
    if isinstance(source, (str, os.PathLike)):
        source = TraceReader(source)
    if isinstance(source, Trace):
        return iter([source]), source.meta, source.num_tokens
    if isinstance(source, TraceReader):
        return (source.iter_chunks(chunk_tokens, weights=weights, token_fields=token_fields),
                source.meta, source.num_tokens)
    it = iter(source)
    first = next(it, None)
    if first is None:
        raise InputError("trace", "experts", "the trace has no tokens",
                         "record or import at least one token")

    def chain() -> Iterator[Trace]:
        yield first
        yield from it

    return chain(), first.meta, None
