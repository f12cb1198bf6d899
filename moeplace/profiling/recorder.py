"""Record every token's experts at every MoE router of a running torch model into a trace.

Overhead is kept off the forward path: each router's indices are copied, on the device, into a
preallocated ``[tokens, layers, k]`` buffer; at the end of the forward one asynchronous copy
moves the step to a pinned host buffer, and a background thread waits for it and does the
bookkeeping and Parquet writing. No hook ever synchronises with the device. Device memory is
one buffer sized by the largest forward seen (a long generation does not grow it); host memory
is bounded by the pinned pool plus, with ``out=``, one write chunk.
"""

from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import InputError, MissingDependencyError, MoeplaceError
from moeplace.profiling.bookkeeping import Liveness, Step, implicit_step, open_step
from moeplace.profiling.routers import Extract, Router, find_routers, shared_experts, transformers_version
from moeplace.traces import Trace, TraceMeta, TraceWriter, read_trace
from moeplace.traces.trace import expert_dtype

_POOL = 4  # pinned host buffers in flight; the forward waits when the writer falls this far behind
_WRITE_TOKENS = 1 << 16  # tokens gathered before a Parquet write (avoids tiny row groups)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "recording routing from a model", "torch") from None
    return torch


@dataclass
class _HostBuffers:
    """One pinned (on CUDA) host copy of a step's device buffers."""

    experts: Any
    weights: Any
    valid: Any
    position: Any
    last: Any
    capacity: int


class Recorder:
    """Context manager that hooks a model's routers; see ``record``."""

    def __init__(self, model: Any, *, weights: bool = False, out: str | Path | None = None,
                 routers: str | None = None, extract: Extract | None = None,
                 num_experts: int | None = None, top_k: int | None = None,
                 eos_token_id: int | list[int] | None = None,
                 shard_tokens: int = 1 << 22) -> None:
        self.model = model
        self.with_weights = weights
        self.out = Path(out) if out is not None else None
        self._router_args = {"routers": routers, "extract": extract, "num_experts": num_experts,
                             "top_k": top_k}
        self._eos = _eos_ids(model, eos_token_id)
        self._shard_tokens = shard_tokens
        self.routers: list[Router] = []
        self.meta: TraceMeta | None = None
        self.num_tokens = 0
        self.dropped_steps = 0
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, bool, Any]] = []
        self._chunks: list[Trace] = []
        self._writer: TraceWriter | None = None
        self._queue: queue.Queue = queue.Queue()
        self._pool: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step: Step | None = None
        self._steps = 0
        self._requests: np.ndarray | None = None
        self._next_request = 0
        self._given: list[int] | None = None
        self._dev_experts: Any = None
        self._dev_weights: Any = None
        self._device: Any = None  # set on entry: the buffers' device
        self._allocated = 0  # host buffer sets created (at most _POOL)
        self._active = False
        self._done = False

    # -- public -------------------------------------------------------------------------------
    def set_request_ids(self, ids: list[int] | np.ndarray) -> None:
        """Request ids for the rows of the next new batch (a forward that starts sequences)."""
        self._given = [int(x) for x in ids]

    def trace(self) -> Trace:
        """The recorded trace (after the ``with`` block; read back from ``out`` if given)."""
        if self._active:
            raise RuntimeError("trace() is available after the recording context exits")
        if not self._done:
            raise RuntimeError("nothing was recorded: use `with record(model) as rec:` first")
        if self.out is not None:
            return read_trace(self.out)
        if not self._chunks:
            raise InputError(type(self.model).__name__, "experts", "no MoE router ran while "
                             "recording", "run the model inside the `with record(...)` block")
        return Trace.concat(self._chunks)

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        torch = _torch()
        self.routers = find_routers(self.model, **self._router_args)
        r0 = self.routers[0]
        cfg = getattr(self.model, "config", None)
        extra: dict[str, Any] = {"routers": [r.name for r in self.routers]}
        version = transformers_version()
        if version is not None:
            extra["transformers"] = ".".join(map(str, version))
        self.meta = TraceMeta(
            num_experts=r0.num_experts, top_k=r0.top_k,
            moe_layer_ids=tuple(r.layer_id for r in self.routers),
            model=str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "")
                      or type(self.model).__name__),
            num_hidden_layers=getattr(cfg, "num_hidden_layers", None),
            num_shared_experts=shared_experts(self.model), source="moeplace.profiling",
            extra=extra)
        if len(set(self.meta.moe_layer_ids)) != len(self.routers):
            self.meta = self.meta.with_updates(moe_layer_ids=tuple(range(len(self.routers))))
        if self.out is not None:
            self._writer = TraceWriter(self.out, self.meta, with_weights=self.with_weights,
                                       token_fields=["request", "position", "phase", "step"],
                                       shard_tokens=self._shard_tokens)
        self._idx_dtype = torch.int16 if r0.num_experts <= 32767 else torch.int32
        self._device = self._find_device()
        self._liveness = Liveness(self._eos)
        self._thread = threading.Thread(target=self._drain, name="moeplace-recorder", daemon=True)
        self._thread.start()
        try:
            self._attach(torch)
        except BaseException:
            self._detach()
            self._stop_thread()
            if self._writer is not None:
                self._writer.abort()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._active = False
        self._done = True
        self._detach()
        self._stop_thread()
        failed = exc_type is not None or self._error is not None
        if self._writer is not None:
            if failed or self.num_tokens == 0:
                self._writer.abort()
            else:
                self._writer.close()
        if self.dropped_steps:
            warnings.warn(f"moeplace: {self.dropped_steps} forward call(s) did not run every "
                          "router once and were not recorded", stacklevel=2)
        if exc_type is None:
            self._check_error()

    # -- hooks --------------------------------------------------------------------------------
    def _attach(self, torch: Any) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post))
        for pos, r in enumerate(self.routers):
            if r.hook_method:
                self._wrap_method(r, pos)
            else:
                seen = self._router_seen(r, pos)
                self._handles.append(r.module.register_forward_hook(
                    lambda module, args, out, seen=seen: seen(out)))

    def _wrap_method(self, r: Router, pos: int) -> None:
        obj, name = r.module, r.hook_method
        assert name is not None
        had = name in vars(obj)
        original = getattr(obj, name)
        seen = self._router_seen(r, pos)

        def wrapper(*a: Any, **k: Any) -> Any:
            out = original(*a, **k)
            seen(out)
            return out

        setattr(obj, name, wrapper)
        self._patched.append((obj, name, had, vars(obj).get(name) if had else None))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, name, had, original in self._patched:
            if had:
                setattr(obj, name, original)
            else:
                delattr(obj, name)
        self._patched.clear()

    def _pre(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        self._check_error()
        step, self._requests, self._next_request = open_step(
            self._steps, args, kwargs, self._requests, self._next_request, self._given,
            track_liveness=bool(self._eos))
        if step is not None and step.past == 0:
            self._given = None
        self._step = step
        self._steps += 1
        if step is not None:
            self._ensure_capacity(step.num_rows)

    def _router_seen(self, r: Router, pos: int) -> Any:
        def seen(out: Any) -> None:
            got = r.extract(out)
            idx, w = got if isinstance(got, tuple) else (got, None)
            idx = idx.reshape(-1, r.top_k)
            n = idx.shape[0]
            step = self._step
            if step is None:
                step, self._next_request = implicit_step(self._steps, n, self._next_request)
                self._step = step
                self._steps += 1
                self._ensure_capacity(n)
            if n != step.num_rows:
                step.mismatch = True  # rows do not match the call's inputs: drop the step
                return
            self._dev_experts[:n, pos].copy_(idx)
            if self.with_weights:
                if w is None:
                    raise InputError(r.name, "weights", "this router's output has no gate weights",
                                     "record with weights=False")
                self._dev_weights[:n, pos].copy_(w.detach().reshape(n, r.top_k))
            step.calls += 1

        return seen

    def _post(self, module: Any, args: tuple, out: Any) -> None:
        step, self._step = self._step, None
        if step is None or step.calls == 0:
            return  # a forward that ran no MoE layer (or was not recognised)
        if step.mismatch or step.calls != len(self.routers):
            self.dropped_steps += 1
            return
        self._ship(step)

    # -- device to host -----------------------------------------------------------------------
    def _ensure_capacity(self, n: int) -> None:
        if self._dev_experts is not None and self._dev_experts.shape[0] >= n:
            return
        torch = _torch()
        dev = self._device
        cap = max(n, 2 * (self._dev_experts.shape[0] if self._dev_experts is not None else 0))
        L, k = len(self.routers), self.routers[0].top_k
        # Normal tensors even when the first forward runs under inference_mode: a buffer made
        # there could not be written by a later forward outside it.
        with torch.inference_mode(False):
            self._dev_experts = torch.zeros((cap, L, k), dtype=self._idx_dtype, device=dev)
            if self.with_weights:
                self._dev_weights = torch.zeros((cap, L, k), dtype=torch.float32, device=dev)

    def _find_device(self) -> Any:
        """Where the buffers live: the first router's device (the model must stay there while
        recording)."""
        r = self.routers[0].module
        for p in r.parameters():
            return p.device
        for p in self.model.parameters():
            return p.device
        return _torch().device("cpu")

    def _host_buffers(self, n: int, batch: int, cuda: bool) -> _HostBuffers:
        torch = _torch()
        try:
            buf = self._pool.get_nowait()
        except queue.Empty:
            buf = None
            if self._allocated >= _POOL:
                while buf is None:  # the writer is behind: wait for a buffer (bounded memory)
                    self._check_error()
                    try:
                        buf = self._pool.get(timeout=0.5)
                    except queue.Empty:
                        pass
        if buf is not None and buf.capacity >= n and buf.last.shape[0] >= batch:
            return buf
        if buf is None:
            self._allocated += 1
        L, k = len(self.routers), self.routers[0].top_k
        cap = max(n, buf.capacity if buf is not None else 0)
        bcap = max(batch, buf.last.shape[0] if buf is not None else 0)
        kw = {"pin_memory": cuda}
        with torch.inference_mode(False):
            return _HostBuffers(
                torch.empty((cap, L, k), dtype=self._idx_dtype, **kw),
                torch.empty((cap, L, k), dtype=torch.float32, **kw) if self.with_weights else None,
                torch.empty(cap, dtype=torch.bool, **kw), torch.empty(cap, dtype=torch.int32, **kw),
                torch.empty(bcap, dtype=torch.int64, **kw), cap)

    def _ship(self, step: Step) -> None:
        torch = _torch()
        n, b = step.num_rows, step.batch
        cuda = self._dev_experts.is_cuda
        buf = self._host_buffers(n, b, cuda)
        buf.experts[:n].copy_(self._dev_experts[:n], non_blocking=cuda)
        if self.with_weights:
            buf.weights[:n].copy_(self._dev_weights[:n], non_blocking=cuda)
        if step.valid is not None:
            buf.valid[:n].copy_(step.valid, non_blocking=cuda)
            buf.position[:n].copy_(step.position, non_blocking=cuda)
        if step.last_ids is not None:
            buf.last[:b].copy_(step.last_ids, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._queue.put((step, buf, event))

    # -- background thread --------------------------------------------------------------------
    def _drain(self) -> None:
        pending: list[Trace] = []
        pending_tokens = 0
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._error is not None:
                continue
            try:
                step, buf, event = item
                if event is not None:
                    event.synchronize()
                chunk = self._to_chunk(step, buf)
                self._pool.put(buf)
                if chunk is None:
                    continue
                self.num_tokens += chunk.num_tokens
                if self._writer is None:
                    self._chunks.append(chunk)
                    continue
                pending.append(chunk)
                pending_tokens += chunk.num_tokens
                if pending_tokens >= _WRITE_TOKENS:
                    self._writer.write(Trace.concat(pending))
                    pending, pending_tokens = [], 0
            except BaseException as exc:  # surfaced on the caller's thread
                self._error = exc
        if pending and self._error is None and self._writer is not None:
            try:
                self._writer.write(Trace.concat(pending))
            except BaseException as exc:
                self._error = exc

    def _to_chunk(self, step: Step, buf: _HostBuffers) -> Trace | None:
        assert self.meta is not None
        n, b, t = step.num_rows, step.batch, step.seqlen
        experts = buf.experts[:n].numpy()
        if step.valid is not None:
            keep = buf.valid[:n].numpy().copy()
            position = buf.position[:n].numpy().astype(np.int32)
        else:
            keep = np.ones(n, bool)
            position = np.tile(np.arange(step.past, step.past + t, dtype=np.int32), b)
        last = buf.last[:b].numpy().copy() if step.last_ids is not None else None
        live = self._liveness.rows_live(step.requests, last, fresh=step.past == 0)
        keep &= np.repeat(live, t)
        if not keep.any():
            return None
        if experts.min() < 0 or experts.max() >= self.meta.num_experts:
            raise InputError(self.routers[0].name, "indices", "a router returned an expert id "
                             f"outside 0..{self.meta.num_experts - 1}",
                             "check the extract function (it must return top-k indices)")
        ex = experts[keep].astype(expert_dtype(self.meta.num_experts))
        w = buf.weights[:n].numpy()[keep].copy() if self.with_weights else None
        tokens = {"request": np.repeat(step.requests, t)[keep],
                  "position": position[keep],
                  "phase": np.full(int(keep.sum()), step.phase, np.int8),
                  "step": np.full(int(keep.sum()), step.index, np.int64)}
        return Trace(ex, self.meta, w, tokens)

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _check_error(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, MoeplaceError):
                raise err
            raise RuntimeError(f"moeplace recorder failed: {err}") from err


def _eos_ids(model: Any, given: int | list[int] | None) -> set[int]:
    if given is None:
        gc = getattr(model, "generation_config", None)
        given = getattr(gc, "eos_token_id", None) if gc is not None else None
    if given is None:
        return set()
    return {int(x) for x in (given if isinstance(given, (list, tuple)) else [given])}


def record(model: Any, *, weights: bool = False, out: str | Path | None = None,
           routers: str | None = None, extract: Extract | None = None,
           num_experts: int | None = None, top_k: int | None = None,
           eos_token_id: int | list[int] | None = None) -> Recorder:
    """Record the routing of ``model`` while it runs inside the ``with`` block.

    ``with record(model) as rec: model.generate(...)``, then ``rec.trace()`` gives the trace:
    ``experts [tokens, moe_layers, k]`` in the order tokens were processed, with each token's
    request, position, phase (prefill/decode) and step; padded positions and the padding that
    ``generate()`` feeds finished sequences are left out. ``weights=True`` also keeps the gate
    weights; ``out=PATH`` streams Parquet shards to PATH instead of holding the trace in memory
    (nothing appears there if the block raises). Custom models: ``routers`` (a glob over module
    names) and ``extract(output) -> indices or (indices, weights)``.
    """
    return Recorder(model, weights=weights, out=out, routers=routers, extract=extract,
                    num_experts=num_experts, top_k=top_k, eos_token_id=eos_token_id)
