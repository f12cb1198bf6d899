"""The ``moeplace`` command line: every stage behind one click group, bad input as one line + exit 2."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import click
import numpy as np
import pandas as pd

from moeplace.errors import InputError, MoeplaceError


class _Group(click.Group):
    """Every way a command can fail ends as one line on stderr and a documented exit code.

    - ``MoeplaceError`` (bad input, missing extra, infeasible request) and usage errors: exit 2;
    - SIGINT, SIGTERM, SIGHUP: temporaries removed, nothing written, exit 128 + signal;
    - a closed stdout (``| head``): quiet, exit 141 like any tool killed by SIGPIPE.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        from moeplace._interrupts import guarded

        with guarded():  # signals stop every phase within about a second (moeplace._interrupts)
            return self._main(args, prog_name, complete_var, **extra)

    def _main(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any
              ) -> Any:
        from moeplace._interrupts import signalled

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            _fail(exc.format_message().replace("\n", " "))
        except click.exceptions.Abort:  # click's own prompt aborts
            _fail("interrupted; nothing written", 130)
        except KeyboardInterrupt as exc:  # during argument parsing
            _interrupted(exc)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except MoeplaceError as exc:
            _fail(str(exc))
        except MemoryError:
            _fail("out of memory (lower the input size, or raise MOEPLACE_MAX_MEMORY only if "
                  "the machine has the memory)")
        except OSError as exc:
            _fail(f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}")
        if signalled() is not None:  # the interrupt was swallowed on the way: still interrupted
            _interrupted(KeyboardInterrupt())
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        return rv

    def invoke(self, ctx: click.Context) -> Any:
        # Handled here, before click's main turns them into exit 1 (pipe) or "Aborted!" (signal).
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt as exc:
            _interrupted(exc)


def _interrupted(exc: KeyboardInterrupt) -> None:
    from moeplace._interrupts import exit_interrupted

    exit_interrupted(exc)  # one line, exit 128 + signal (see moeplace._interrupts)


def _fail(message: str, code: int = 2) -> None:
    from moeplace._interrupts import signalled

    if signalled() is not None:  # an error a stopped solver caused: report the signal
        _interrupted(KeyboardInterrupt())
    # One line, whatever the message holds: a caller's script greps it.
    line = " ".join(str(message).split())
    try:
        click.echo(f"moeplace: error: {line}", err=True)
    except (BrokenPipeError, OSError):
        pass
    sys.exit(code)


def _quiet_broken_pipe() -> None:
    # The reader went away (``| head``): say nothing, and keep Python from complaining at exit
    # when it flushes stdout again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    sys.exit(141)


class _Number(click.ParamType):
    """An int or float flag that must be finite and inside ``[lo, hi]`` (``lo_open``: ``> lo``)."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
        self.kind = kind
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.name = "integer" if kind is int else "number"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = self.kind(str(value).strip())
            except (TypeError, ValueError, OverflowError):
                self.fail(f"{value!r} is not {'an' if self.kind is int else 'a'} {self.name}",
                          param, ctx)
        if self.kind is float and not math.isfinite(v):
            self.fail(f"{value!r} is not finite", param, ctx)
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            self.fail(f"{value!r} must be {'>' if self.lo_open else '>='} {self.lo:g}", param, ctx)
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            self.fail(f"{value!r} must be {'<' if self.hi_open else '<='} {self.hi:g}", param, ctx)
        return v


# Bounds are the semantic ones; sizes are capped where a huge value would only mean a typo
# whose cost (memory, time) would land before any other check could see it.
POS_INT = _Number(int, 1, 1 << 31)
NONNEG_INT = _Number(int, 0, 1 << 31)
SEED = _Number(int, 0, 2**32 - 1)
NONNEG_FLOAT = _Number(float, 0.0)
UNIT_FLOAT = _Number(float, 0.0, 1.0)
OPEN_UNIT_FLOAT = _Number(float, 0.0, 1.0, lo_open=True, hi_open=True)
POS_FLOAT = _Number(float, 0.0, lo_open=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeplace")
def main() -> None:
    """Place the experts of a Mixture-of-Experts model across GPUs from its routing traces."""


# ---- shared helpers -------------------------------------------------------------------------
MAX_LAYER_IDS = 100_000  # no model has more layers; a longer list is a typo or an attack


def _layer_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) > MAX_LAYER_IDS:
        raise InputError("--moe-layers", "value", f"{len(parts):,} ids, more than any model has",
                         f"give at most {MAX_LAYER_IDS:,} ids")
    try:
        ids = [int(x) for x in parts if x.strip()]
    except ValueError:
        raise InputError("--moe-layers", "value", f"{text[:40]!r} is not a comma-separated list "
                         "of integers", "e.g. --moe-layers 1,2,3") from None
    if not ids:
        raise InputError("--moe-layers", "value", "is empty", "e.g. --moe-layers 1,2,3")
    bad = [i for i in ids if not 0 <= i < 1 << 31]
    if bad:
        raise InputError("--moe-layers", "value", f"id {bad[0]} is out of range",
                         "hidden-layer ids are non-negative")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError("--moe-layers", "value", f"id {dup} appears twice",
                         "give each MoE layer's hidden-layer id once")
    return ids


def _paths(inputs: tuple[str, ...] = (), outputs: dict[str, bool | None] | None = None) -> Any:
    """Decorator: the named parameters are the command's inputs (never written) and outputs
    (checked before any work starts, so a bad ``--out`` fails in a second, not after an hour).
    ``outputs`` maps a parameter to True (directory), False (file) or None (either)."""
    import functools

    def deco(f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(**kw: Any) -> Any:
            from moeplace._fileio import check_output, protected_inputs

            named = [kw.get(n) for n in inputs]
            flat = [x for v in named for x in (v if isinstance(v, (tuple, list)) else [v])]
            for x in flat:
                _check_input_kind(x)
            with protected_inputs(*flat):
                for name, directory in (outputs or {}).items():
                    if kw.get(name) is not None:
                        check_output(kw[name], directory=directory)
                return f(**kw)
        return wrapper
    return deco


def _check_input_kind(path: str | None) -> None:
    """An input that is a FIFO, socket or device would block or never end: refuse it up front.
    Missing paths are left to the reader, which names the field."""
    import stat

    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(path, "path", "is not a regular file or directory (a FIFO, socket or "
                         "device)", "save the data to a file and pass that")


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff",
                 ".webp")


def _plot_path(ctx: Any, param: Any, value: str | None) -> str | None:
    if value is not None and not value.lower().endswith(PLOT_SUFFIXES):
        raise click.BadParameter(f"{value!r} has no image suffix; use one of "
                                 f"{', '.join(PLOT_SUFFIXES)}")
    return value


_import_options = [
    click.option("--format", "fmt", default="auto", show_default=True,
                 type=click.Choice(["auto", "parquet", "npz", "vllm", "sglang", "sglang-dump",
                                    "megatron", "trtllm"]),
                 help="Input format (trtllm: a TensorRT-LLM EXPERT_STATISTIC_PATH directory)."),
    click.option("--num-experts", type=POS_INT, help="Experts per layer (default: largest id + 1)."),
    click.option("--moe-layers", help="Hidden-layer ids of the MoE layers, comma separated "
                 "(default: detected)."),
    click.option("--top-k", type=POS_INT, help="Experts per token (SGLang per-request input)."),
    click.option("--num-hidden-layers", type=_Number(int, 1, MAX_LAYER_IDS),
                 help="Hidden layers (SGLang per-request input)."),
    click.option("--missing-id", type=NONNEG_INT, help="npz: the id marking a lost record "
                 "(tokens with one are dropped and counted); only a file's own missing_id is "
                 "honoured otherwise."),
]


def import_options(f: Any) -> Any:
    for opt in reversed(_import_options):
        f = opt(f)
    return f


def _load(path: str, fmt: str = "auto", num_experts: int | None = None,
          moe_layers: str | None = None, top_k: int | None = None,
          num_hidden_layers: int | None = None, missing_id: int | None = None) -> Any:
    from moeplace.traces import load_routing

    obj = load_routing(path, fmt, num_experts=num_experts, moe_layer_ids=_layer_ids(moe_layers),
                       top_k=top_k, num_hidden_layers=num_hidden_layers, missing_id=missing_id)
    _note_dropped(obj, path)
    return obj


def _note_dropped(obj: Any, path: str) -> None:
    """Tokens an importer left out are never silent: one line on stderr."""
    n = obj.meta.dropped_tokens
    if n:
        click.echo(f"moeplace: note: {path}: dropped {n:,} tokens with a record marked lost "
                   "(missing_id); counts cover the rest", err=True)


def _open(path: str, kw: dict[str, Any], in_memory_max: int | None = None) -> Any:
    """Trace, TraceReader (Parquet over ``in_memory_max`` tokens, streamed) or RoutingStats."""
    from moeplace.traces import detect_format, open_trace

    fmt = kw.get("fmt", "auto")
    if fmt == "parquet" or (fmt == "auto" and detect_format(path) == "parquet"):
        reader = open_trace(path)
        _note_dropped(reader, path)
        if in_memory_max is not None and reader.num_tokens > in_memory_max:
            return reader
        return reader.read()
    return _load(path, **kw)


def _stats_of(path: str, **kw: Any) -> tuple[Any, Any]:
    """(RoutingStats, Trace or TraceReader or None) for any trace or statistics source;
    Parquet traces are streamed (a reader comes back, not the tokens)."""
    from moeplace.traces import RoutingStats, compute_stats

    obj = _open(path, kw, in_memory_max=0)
    if isinstance(obj, RoutingStats):
        return obj, None
    return compute_stats(obj), obj


def _print_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> None:
    with pd.option_context("display.max_rows", 500, "display.width", 200,
                           "display.max_columns", 50,
                           "display.float_format", floatfmt.format):
        click.echo(df.to_string(index=False))


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


# ---- analyze -------------------------------------------------------------------------------
@main.command()
@click.argument("trace", required=False)
@click.option("--demo", is_flag=True, help="Analyse the bundled FLAME-MoE-290M sample.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=_plot_path,
              help="Save load and transition heatmaps to this image file (.png, .pdf, .svg).")
@click.option("--top", type=NONNEG_INT, default=10, show_default=True, help="Top transitions to list.")
@click.option("--drift-windows", type=NONNEG_INT, default=8, show_default=True,
              help="Windows for the load-drift table (per-token traces only).")
@import_options
@_paths(inputs=("trace",), outputs={"plot_path": False})
def analyze(trace: str | None, demo: bool, as_json: bool, plot_path: str | None, top: int,
            drift_windows: int, **kw: Any) -> None:
    """Per-layer skew and cross-layer affinity of a routing trace (or statistics file)."""
    from moeplace.traces import analysis
    from moeplace.traces.demo import demo_trace_path

    if demo:
        trace = str(demo_trace_path())
    if not trace:
        raise InputError("analyze", "TRACE", "no trace given", "pass a trace path or --demo")
    stats, tr = _stats_of(trace, **kw)
    if plot_path:
        analysis.plot(stats, plot_path)
    if as_json:
        out = analysis.summary(stats, analysis.layer_table(stats))
        if stats.transitions is not None and stats.num_layers > 1:
            out["top_transitions"] = analysis.top_transitions(stats, top).to_dict("records")
        if tr is not None and drift_windows > 1 and tr.num_tokens >= drift_windows:
            out["drift"] = analysis.drift(tr, drift_windows).to_dict("records")
        _echo_json(out)
        return
    _print_analysis(stats, tr, trace, top, drift_windows)
    if plot_path:
        click.echo(f"\nwrote {plot_path}")


def _print_analysis(stats: Any, tr: Any, name: str, top: int, drift_windows: int) -> None:
    """The human-readable analysis: per-layer table, top transitions, load drift."""
    from moeplace.traces import analysis

    m = stats.meta
    click.echo(f"{m.model or name}: {stats.num_tokens:,} tokens, {stats.num_layers} MoE layers, "
               f"{stats.num_experts} experts, top-{m.top_k}")
    _print_table(analysis.layer_table(stats))
    if stats.transitions is not None and stats.num_layers > 1 and top > 0:
        click.echo(f"\ntop {top} transitions (expert at layer -> expert at next layer):")
        _print_table(analysis.top_transitions(stats, top))
    if tr is not None and drift_windows > 1 and tr.num_tokens >= drift_windows:
        click.echo(f"\nload drift over {drift_windows} windows (JS divergence from the whole, bits):")
        _print_table(analysis.drift(tr, drift_windows), "{:.4f}")


# ---- profile -------------------------------------------------------------------------------
@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Local model directory (save_pretrained layout; never downloaded).")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False),
              help="Prompts: .txt (one per line) or .jsonl ({\"prompt\": ...} per line).")
@click.option("--out", required=True, type=click.Path(),
              help="Trace to write: FILE.parquet, or a directory of Parquet shards.")
@click.option("--max-new-tokens", type=NONNEG_INT, default=32, show_default=True,
              help="Greedy tokens generated per prompt (0: prefill only).")
@click.option("--batch-size", type=POS_INT, default=8, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--weights", is_flag=True, help="Record gate weights too.")
@_paths(inputs=("model_dir", "prompts"), outputs={"out": None})
def profile(model_dir: str, prompts: str, out: str, max_new_tokens: int, batch_size: int,
            dtype: str, device: str, weights: bool) -> None:
    """Run a local transformers MoE model over PROMPTS and record its routing trace."""
    from pathlib import Path

    from moeplace.profiling.run import profile as run_profile
    from moeplace.profiling.run import read_prompts

    if Path(out).exists() or Path(out).is_symlink():
        raise InputError(out, "--out", "already exists", "choose a new path or remove it first")
    _check_device(device)
    texts = read_prompts(prompts)
    rec = run_profile(model_dir, texts, out, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, dtype=dtype, device=device, weights=weights)
    stats, tr = _stats_of(out)  # a long profile is summarised by streaming it back
    click.echo(f"wrote {out}: {stats.num_tokens:,} tokens from {len(texts)} prompts, "
               f"{stats.num_layers} MoE layers (routers {rec.routers[0].name}, ...)\n")
    _print_analysis(stats, tr, out, top=5, drift_windows=0)


def _check_device(device: str) -> None:
    """Refuse a device this torch build or machine does not have, before the model loads."""
    if device in ("auto", "cpu"):
        return
    try:
        import torch
    except ImportError:
        return  # the profiler itself says how to install torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError("--device", "value", f"{device!r} is not a torch device",
                         "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    if backend is None or not backend.is_available():
        raise InputError("--device", "value", f"{dev.type} is not available in this torch build "
                         "or on this machine", "use --device cpu (or auto)")
    if dev.index is not None and dev.index >= backend.device_count():
        raise InputError("--device", "value", f"{device} does not exist (this machine has "
                         f"{backend.device_count()})", "pick an index that exists")


# ---- stats / convert / synth ----------------------------------------------------------------
@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz.")
@click.option("--ray", "ray_address", metavar="ADDRESS|local",
              help="Count Parquet shards as Ray tasks on this cluster ('local': start one here; "
              "needs moeplace[ray]).")
@import_options
@_paths(inputs=("sources",), outputs={"out": False})
def stats(sources: tuple[str, ...], out: str, ray_address: str | None, **kw: Any) -> None:
    """Aggregate traces (files, shard directories, quoted globs) into statistics (.npz) that
    add up across shards; with --ray, on a Ray cluster."""
    if ray_address:
        from moeplace.service.fleet import stats_on_ray

        if kw.get("fmt") not in ("auto", "parquet"):
            raise InputError("--ray", "--format", "Ray aggregation reads Parquet shards",
                             "convert other formats with 'moeplace convert' first")
        st = stats_on_ray(sources, ray_address)
    else:
        from pathlib import Path

        from moeplace.service.fleet import expand_sources

        st = None
        # Directories and globs count shard by shard, exactly as the Ray tasks do; other
        # sources (any importable format) one by one.
        paths = [str(p) for src in sources for p in (
            expand_sources([src]) if Path(src).is_dir() or not Path(src).exists() else [src])]
        for src in paths:
            part, _ = _stats_of(src, **kw)
            st = part if st is None else st + part
    st.save(out)
    click.echo(f"wrote {out}: {st.num_tokens:,} tokens, {st.num_layers} layers, "
               f"{st.num_experts} experts")


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--model", default="", help="Model name to record in the trace metadata.")
@import_options
@_paths(inputs=("src",), outputs={"dst": None})
def convert(src: str, dst: str, model: str, **kw: Any) -> None:
    """Import SRC (vLLM, SGLang, Megatron, .npz, Parquet) and write DST as a Parquet trace."""
    from moeplace.traces import RoutingStats, TraceReader, TraceWriter, write_trace

    obj = _open(src, kw, in_memory_max=0)
    if isinstance(obj, TraceReader):  # Parquet to Parquet streams chunk by chunk
        from moeplace._progress import Progress

        meta = obj.meta.with_updates(model=model) if model else obj.meta
        with TraceWriter(dst, meta, with_weights=obj.has_weights,
                         token_fields=obj.token_fields) as w, \
                Progress(obj.num_tokens, "convert", "tokens") as bar:
            for chunk in obj.iter_chunks():
                chunk.meta = meta
                w.write(chunk)
                bar.update(chunk.num_tokens)
        click.echo(f"wrote {dst}: {obj.num_tokens:,} tokens x {meta.num_layers} layers x top-"
                   f"{meta.top_k} of {meta.num_experts} experts")
        return
    if isinstance(obj, RoutingStats):
        raise InputError(src, "format", "holds aggregated counts, not per-token routing",
                         "use 'moeplace stats' or pass it to solve directly")
    if model:
        obj.meta = obj.meta.with_updates(model=model)
    write_trace(obj, dst)
    click.echo(f"wrote {dst}: {obj.num_tokens:,} tokens x {obj.num_layers} layers x top-"
               f"{obj.top_k} of {obj.num_experts} experts"
               + (f" (dropped {obj.dropped_tokens:,} tokens with lost records)"
                  if obj.dropped_tokens else ""))


@main.command()
@click.option("--preset", default="deepseek-v3", show_default=True,
              help="Model shape: deepseek-v3, kimi-k2, deepseek-v2-lite, qwen3-30b-a3b, mixtral, "
                   "flame-moe-290m.")
@click.option("--tokens", type=_Number(int, 1, 10**10), default=100_000, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--skew", type=_Number(float, 0.0, 10.0),
              help="Zipf exponent of per-layer popularity (0..10).")
@click.option("--affinity", type=UNIT_FLOAT, help="Weight of topic-specific routing (0..1).")
@click.option("--stickiness", type=UNIT_FLOAT, help="Chance a token keeps its topic per layer (0..1).")
@click.option("--weights", is_flag=True, help="Also write gate weights.")
@click.option("--prompt-tokens", type=NONNEG_INT, help="Phase column: the first N tokens of each "
              "request are prefill, the rest decode (default: every token prefill).")
@click.option("--out", required=True, type=click.Path(), help="Output Parquet trace.")
@_paths(outputs={"out": None})
def synth(preset: str, tokens: int, seed: int, skew: float | None, affinity: float | None,
          stickiness: float | None, weights: bool, prompt_tokens: int | None, out: str) -> None:
    """Write a seeded synthetic trace with controllable skew and cross-layer affinity."""
    from moeplace._progress import Progress
    from moeplace.traces import SyntheticRouter, TraceWriter
    from moeplace.traces.synthetic import preset as get_preset

    over = {k: v for k, v in (("skew", skew), ("affinity", affinity),
                              ("stickiness", stickiness)) if v is not None}
    router = SyntheticRouter(get_preset(preset, **over), seed)
    bar = Progress(tokens, "synth", "tokens")
    with TraceWriter(out, router.meta, with_weights=weights,
                     token_fields=["request", "position", "phase"]) as w:
        for chunk in router.sample(tokens, weights=weights, prompt_tokens=prompt_tokens):
            w.write(chunk)
            bar.update(chunk.num_tokens)
    bar.close()
    click.echo(f"wrote {out}: {tokens:,} tokens of {router.meta.model}")


# ---- evaluate -------------------------------------------------------------------------------
@main.command()
@click.argument("trace")
@click.argument("placement")
@click.option("--home", type=click.Choice(["static", "follow"]), default="static",
              show_default=True, help="Execution model whose replica choices set the GPU loads.")
@click.option("--window", type=POS_INT, default=4096, show_default=True,
              help="Tokens per window for windowed load imbalance.")
@click.option("--current", type=click.Path(dir_okay=False),
              help="Current placement, to report migration cost.")
@click.option("--expert-bytes", type=_Number(int, 0, 1 << 40), default=0, show_default=True,
              help="Bytes of one expert's weights, for migration bytes with --current.")
@click.option("--tokens-per-step", type=POS_INT, help="Tokens per serving step for "
              "active_experts_* (default: the trace's step ids, else 4096).")
@click.option("--gpu-speeds", help="Relative speed of each GPU in rank order, e.g. "
              "1,1,1,1,0.7,0.7,0.7,0.7: imbalances become speed-aware.")
@click.option("--dispatch", type=click.Choice(["alltoall", "deepep-normal", "deepep-ll",
                                                "deepep-v2"]),
              help="Also price each step's dispatch and combine by this kernel's counting rule "
              "and the --hardware profile's fit (dispatch_us, combine_us, step_ms).")
@click.option("--hardware", default="h800-ib", show_default=True,
              help="Hardware profile for --dispatch: h100-nvlink, h100-ib, h800-ib or a JSON file.")
@click.option("--model-shape", help="Model shape for --dispatch (hidden size, expert size), e.g. "
              "deepseek-v3 (default: guessed from the trace's model name).")
@click.option("--phase", type=click.Choice(["prefill", "decode"]),
              help="Score only this phase's tokens (traces with a phase column; otherwise all, "
              "said so), the table's step priced by its kernel (prefill deepep-normal, decode "
              "deepep-ll; default: every token, deepep-normal).")
@click.option("--per-layer", is_flag=True, help="Print the per-layer table too.")
@click.option("--all-metrics", is_flag=True, help="Print every metric, also those that cannot "
              "differ here (node metrics on one node, ...); --json always has them all.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@import_options
@_paths(inputs=("trace", "placement", "current", "hardware"))
def evaluate(trace: str, placement: str, home: str, window: int, current: str | None,
             expert_bytes: int, tokens_per_step: int | None, gpu_speeds: str | None,
             dispatch: str | None, hardware: str, model_shape: str | None, phase: str | None,
             per_layer: bool, all_metrics: bool, as_json: bool, **kw: Any) -> None:
    """Score PLACEMENT (JSON) on TRACE with the shared metrics of docs/objective.md, next to
    the baselines fitted to TRACE."""
    from moeplace.placement import Placement
    from moeplace.solvers import report as rpt
    from moeplace.solvers.cost import parse_gpu_speeds
    from moeplace.traces import RoutingStats

    plc = Placement.load(placement)
    speeds = None if gpu_speeds is None else parse_gpu_speeds(gpu_speeds, plc.num_gpus)
    cur = Placement.load(current) if current else None
    src = _open(trace, kw, in_memory_max=0)  # Parquet is streamed
    if isinstance(src, RoutingStats):
        raise InputError(trace, "format", "aggregated counts cannot be scored per token",
                         "give a per-token trace")
    picked = None
    if phase is not None:
        from moeplace.traces import select_phase

        picked = select_phase(src, phase)
        src = picked.source
    sim = None
    if dispatch is not None:
        from moeplace.solvers.simulator import Hardware, ModelShape, guess_shape

        shape = model_shape or guess_shape(src.meta.model or src.meta.source or "")
        if shape is None:
            raise InputError(trace, "model", "no model shape known for --dispatch",
                             "pass --model-shape, e.g. deepseek-v3")
        sim = (Hardware.load(hardware), ModelShape.named(shape))
    # The table's step_ms: the kernel asked for, else SGLang's kernel of the phase (as solve).
    from moeplace.solvers.dispatch import default_kernel

    res = rpt.evaluate_with_baselines(src, plc, window=window, home=home, current=cur,
                                      expert_bytes=expert_bytes, tokens_per_step=tokens_per_step,
                                      gpu_speeds=speeds, hardware=hardware,
                                      kernel=dispatch or default_kernel("sglang", phase or "prefill"),
                                      model_shape=model_shape)
    if picked is not None:  # after the input is checked: bad input stays one line
        click.echo(f"moeplace: note: {picked.note(trace)}", err=True)
    if sim is not None:
        from moeplace.solvers.scoring import priced_steps

        res.summary.update(priced_steps(src, plc, sim, dispatch, tokens_per_step or 4096,
                                        speeds))
    headline = rpt.headline(res.rows, "placement", where="trace", num_nodes=plc.num_nodes,
                            home=home, no_step=res.step_note)
    gains = strongest_baseline_gains(res.rows, "placement")
    if as_json:
        out = dict(res.summary)
        out.update(headline=headline, comparison=res.rows.to_dict("records"))
        if picked is not None:
            out["phase"] = picked.as_dict()
        if len(gains):
            out["vs_strongest_baseline"] = gains.to_dict("records")
        if per_layer:
            out["per_layer"] = res.per_layer.to_dict("records")
        _echo_json(out)
        return
    click.echo(headline + "\n")
    shape = {"num_gpus": plc.num_gpus, "num_nodes": plc.num_nodes,
             "num_layers": plc.num_layers, "current": cur is not None,
             "expert_bytes": expert_bytes, "all_metrics": all_metrics}
    if per_layer:
        _print_metrics(res.per_layer, like=res.rows, **shape)
        click.echo("")
    # The summary's keys hide by the same rules as the table's columns.
    hidden = rpt.Hidden() if all_metrics else rpt.hidden_columns(
        res.summary, rows=res.rows, one_window=res.summary["tokens"] <= window,
        **{k: v for k, v in shape.items() if k != "all_metrics"})
    # (the per-layer table above already named what it left out)
    for k, v in res.summary.items():
        if k in hidden.columns:
            continue
        if isinstance(v, list):  # gpu_speeds
            v = ",".join(f"{x:g}" for x in v)
        click.echo(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    if hidden.note():
        click.echo(hidden.note())
    click.echo(f"\nnext to the baselines fitted to {trace} (lower is better):")
    _print_metrics(rpt.table(res.rows), **shape)


# ---- solve ----------------------------------------------------------------------------------
def _simulation(model_shape: str | None, hardware: str, trace: Any) -> Any:
    """(Hardware, ModelShape) for the speedup column, or None when the shape is unknown."""
    from moeplace.solvers.simulator import Hardware, ModelShape, guess_shape

    if trace is None:
        return None
    name = model_shape or guess_shape(trace.meta.model or trace.meta.source)
    if name is None:
        return None
    return Hardware.load(hardware), ModelShape.named(name)


def _metric_rows(plcs: dict[str, Any], trace: Any, stats: Any, window: int,
                 sim: Any = None, tokens_per_step: int = 4096, speeds: Any = None,
                 kernel: str | None = None) -> pd.DataFrame:
    """Evaluator metrics per placement (names as in docs/metrics.md): per-token when a trace is
    at hand (one pass for all), else from stats; with a simulation profile, the simulated step
    time and the speedup over the fastest baseline in the table."""
    from moeplace.solvers import evaluate_many, evaluate_stats

    if trace is None:
        return _rows({n: evaluate_stats(stats, p, gpu_speeds=speeds) for n, p in plcs.items()},
                     {}, False)
    res = evaluate_many(trace, list(plcs.values()), window=window, show_progress=False,
                        gpu_speeds=speeds)
    step_ms: dict[str, float] = {}
    if sim is not None:
        from moeplace.solvers.simulator import step_time

        step_ms = {n: 1e3 * step_time(trace, p, *sim, tokens_per_step, kernel=kernel)["step_s"]
                   for n, p in plcs.items()}
    return _rows({n: r.summary for n, r in zip(plcs, res, strict=True)}, step_ms, True)


def _rows(summaries: dict[str, dict[str, Any]], step_ms: dict[str, float],
          per_token: bool) -> pd.DataFrame:
    """The comparison table from evaluator summaries (and simulated step times)."""
    rows = []
    for name, s in summaries.items():
        row = {"placement": name, "load_imbalance_mean": s["load_imbalance_mean"],
               "load_imbalance_max": s["load_imbalance_max"],
               "cross_gpu_pair_fraction": s.get("cross_gpu_pair_fraction", float("nan")),
               "cross_node_pair_fraction": s.get("cross_node_pair_fraction", float("nan"))}
        if per_token:
            row["traffic_static"] = s["traffic_static"]
            row["traffic_static_remote_nodes"] = s["traffic_static_remote_nodes"]
            row["traffic_follow"] = s["traffic_follow"]
            row["active_experts_max"] = s["active_experts_max"]
            row["active_experts_imbalance"] = s["active_experts_imbalance"]
            if name in step_ms:
                row["step_ms"] = step_ms[name]
        rows.append(row)
    df = pd.DataFrame(rows)
    from moeplace.solvers.solve import BASELINES

    base = df[df["placement"].isin(BASELINES)]
    if "step_ms" in df and len(base) and df["step_ms"].notna().all():
        df["speedup"] = float(base["step_ms"].min()) / df["step_ms"]
    return df


_GAIN_METRICS = ("load_imbalance_mean", "load_imbalance_max", "cross_gpu_pair_fraction",
                 "cross_node_pair_fraction", "traffic_static", "traffic_static_remote_nodes",
                 "traffic_follow", "active_experts_max", "active_experts_imbalance", "step_ms")


def strongest_baseline_gains(df: pd.DataFrame, ours: str) -> pd.DataFrame:
    """Per metric (lower is better): ``ours``'s value, the strongest baseline's value and name,
    and the relative change. Gains are only ever quoted against this baseline."""
    from moeplace.solvers.solve import BASELINES

    base = df[df["placement"].isin(BASELINES) & (df["placement"] != ours)]
    me = df[df["placement"] == ours]
    rows = []
    if not len(base) or not len(me):
        return pd.DataFrame(rows)
    for m in _GAIN_METRICS:
        if m not in df or base[m].isna().all():
            continue
        b = base.loc[base[m].idxmin()]
        v, bv = float(me[m].iloc[0]), float(b[m])
        rows.append({"metric": m, "value": v, "strongest_baseline": b["placement"],
                     "baseline_value": bv, "change": (v - bv) / bv if bv else 0.0})
    return pd.DataFrame(rows)


def _baselines_for(cluster: Any) -> tuple[str, ...]:
    """Baselines shown next to a solve: round-robin only without replicas (it has no rule)."""
    names = ("contiguous", "round_robin", "eplb", "eplb-distinct")
    return tuple(n for n in names if not (n == "round_robin" and cluster.replicas))


@main.command()
@click.argument("source")
@click.option("--gpus", type=POS_INT, required=True, help="GPUs (expert-parallel ranks).")
@click.option("--nodes", type=POS_INT, default=1, show_default=True, help="Nodes the GPUs span.")
@click.option("--replicas", type=NONNEG_INT, default=0, show_default=True,
              help="Redundant expert copies per layer (slots beyond one per expert).")
@click.option("--method", type=click.Choice(["auto", "search", "dp", "cpsat", "ilp-cbc",
                                             "ilp-highs", "moetuner", "eplb", "eplb-distinct",
                                             "contiguous", "round_robin", "random"]),
              default="auto",
              show_default=True)
@click.option("--weights", "weights_text", help="Objective weights, e.g. load=1,traffic=1,node=1,"
              "coact=0.5,migration=0.1 (coact: within-layer co-activation, for the static model).")
@click.option("--engine", type=click.Choice(["sglang", "vllm", "trtllm", "exflow"]),
              help="Engine the placement is for, which picks the traffic objective: sglang, vllm, "
              "trtllm (static home, DeepEP dispatch: distinct remote GPUs and nodes per token; "
              "the default for search) or exflow (cross-layer pairs, MoETuner; what dp, cpsat, "
              "ilp-* and moetuner optimise).")
@click.option("--phase", type=click.Choice(["prefill", "decode"]),
              help="Solve for one phase of a disaggregated deployment: fit and score only that "
              "phase's tokens (traces with a phase column; otherwise all, said so) with its "
              "kernel; decode also balances the expected active experts per step of "
              "--tokens-per-step tokens (memory-bound decode) instead of tokens (search). "
              "Default: every token, prefill's objective and kernel.")
@click.option("--dispatch", type=click.Choice(["alltoall", "deepep-normal", "deepep-ll",
                                               "deepep-v2"]),
              help="Dispatch kernel whose counting rule the traffic terms follow (default: the "
              "engine and --phase, as SGLang's --deepep-mode auto: prefill deepep-normal, decode "
              "deepep-ll; exflow alltoall). deepep-ll pays one copy per (token, expert): "
              "co-location does not pay, so only balance is optimised.")
@click.option("--gpu-speeds", help="Relative speed of each GPU in rank order, e.g. "
              "1,1,1,1,0.7,0.7,0.7,0.7: the search balances GPU time, and imbalances, bounds and "
              "the simulator become speed-aware.")
@click.option("--balance-slack", type=NONNEG_FLOAT, default=0.0, show_default=True,
              help="search: max GPU load per layer may exceed EPLB's by this fraction (on the "
              "fitted load and on each sixteenth of the requests).")
@click.option("--time-limit", type=POS_FLOAT, default=60.0, show_default=True, help="Seconds.")
@click.option("--holdout", type=OPEN_UNIT_FLOAT, help="Fit on a request split, report on the held-out "
              "FRACTION of requests as well.")
@click.option("--current", type=click.Path(dir_okay=False), help="Placement serving now "
              "(reports migration; with a migration weight, penalises moves).")
@click.option("--groups", "num_groups", type=POS_INT, help="Expert groups (the model's n_group) for "
              "the EPLB baselines' hierarchical policy; default: from the trace or "
              "--model-shape, else 1 (global policy on several nodes, as vLLM and SGLang).")
@click.option("--respect-groups", "respect_groups", type=POS_INT, metavar="N_GROUP",
              help="Move only whole routing groups (the model's n_group, DeepSeek-V3: 8), so "
              "'moeplace apply' keeps group-limited routing unchanged.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the search, the random baseline and the --holdout split.")
@click.option("--restarts", type=_Number(int, 1, 1024), default=1, show_default=True,
              help="search: parallel restarts from seeds SEED, SEED+1, ... (one process each; "
              "static engines: the layers split among them first).")
@click.option("--window", type=POS_INT, default=4096, show_default=True,
              help="Tokens per window for windowed load imbalance.")
@click.option("--expert-bytes", type=_Number(int, 0, 1 << 40), default=0, show_default=True,
              help="Bytes of one expert's weights, for migration bytes with --current.")
@click.option("--ray", "ray_address", metavar="ADDRESS|local",
              help="search: run the restarts as Ray tasks on this cluster ('local': start one "
              "here; needs moeplace[ray]); the best is kept, ties to the lowest seed.")
@click.option("--pareto", "show_pareto", is_flag=True,
              help="Print the traffic-versus-balance frontier of the search.")
@click.option("--hardware", default="h800-ib", show_default=True,
              help="Simulator profile for step_ms: h800-ib (dispatch fitted to DeepEP's "
              "published V1 tables), h100-nvlink, h100-ib or a JSON file.")
@click.option("--model-shape", help="Expert size for the simulator (default: from the trace's "
              "model name, e.g. deepseek-v2-lite, mixtral-8x7b, deepseek-v3).")
@click.option("--tokens-per-step", type=POS_INT, default=4096, show_default=True,
              help="Tokens in one serving step: the simulated step, and with --phase decode the "
              "decode batch the search balances and the evaluator's active_experts_* step.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the placement JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=_plot_path,
              help="Draw per-GPU load and traffic per layer against EPLB (held-out requests with "
              "--holdout) to this image file (.png, .pdf, .svg; needs matplotlib).")
@click.option("--all-metrics", is_flag=True, help="Print every metric column, also those that "
              "cannot differ here (node metrics on one node, ...); --json always has them all.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@import_options
@_paths(inputs=("source", "current", "hardware"), outputs={"out": False, "plot_path": False})
def solve(source: str, gpus: int, nodes: int, replicas: int, method: str,
          engine: str | None, phase: str | None, dispatch: str | None, gpu_speeds: str | None,
          weights_text: str | None, balance_slack: float, time_limit: float,
          holdout: float | None, current: str | None, num_groups: int | None,
          respect_groups: int | None, seed: int,
          restarts: int, window: int, expert_bytes: int, ray_address: str | None,
          show_pareto: bool, hardware: str,
          model_shape: str | None,
          tokens_per_step: int, out: str | None, plot_path: str | None, all_metrics: bool,
          as_json: bool, **kw: Any) -> None:
    """Find an expert placement for SOURCE (trace or statistics) on GPUS GPUs."""
    import contextlib

    import moeplace.solvers.solve  # noqa: F401  (fills the method registry)
    from moeplace.solvers import report as rpt
    from moeplace.solvers.registry import get

    if plot_path:  # before any work: a missing extra or a clash fails in a second
        rpt.require_matplotlib()
        if out and os.path.realpath(out) == os.path.realpath(plot_path):
            raise InputError(plot_path, "--plot", "is also --out", "write them to two files")

    # The engine's objective must be one the method optimises; checked before Ray starts.
    solver = None if method == "auto" else get(method)
    if engine and solver is not None and not solver.baseline and engine not in solver.engines:
        raise InputError("solve", "--engine", f"--method {method} optimises the "
                         f"{'/'.join(solver.engines)} objective, not {engine}'s",
                         f"use --method search for {engine}, or --engine {solver.engines[0]}")
    if engine is None:
        engine = solver.engines[0] if solver is not None and not solver.baseline else "sglang"
    session: Any = contextlib.nullcontext()
    runner = None
    if ray_address:
        from moeplace.service.fleet import ray_restart_runner, ray_session

        # Connected before the budget starts, so Ray's start-up is not taken from --time-limit.
        session, runner = ray_session(ray_address), ray_restart_runner
    with session:
        import time

        from moeplace.errors import TimeLimitError
        from moeplace.placement import Placement
        from moeplace.solvers import Cluster, Weights, pareto, solve_with_report
        from moeplace.solvers.scoring import (
            held_requests,
            score_placements,
            scoring_seconds,
            split_stream,
        )
        from moeplace.solvers.solve import baseline, check_request, default_groups
        from moeplace.traces import RoutingStats, compute_stats, select_phase

        # The budget covers the whole command from here: reading and counting the trace too,
        # not the imports above (seconds on a busy machine, and nothing --time-limit governs).
        started = time.monotonic()
        weights = Weights.parse(weights_text)
        from dataclasses import replace as _replace

        from moeplace.solvers.dispatch import default_kernel
        asked_phase, phase = phase, phase or "prefill"  # the objective's phase by default
        kernel = dispatch or default_kernel(engine or "sglang", phase)
        if kernel == "deepep-ll" and (weights.traffic or weights.node):
            # One put per (token, selected expert): remote copies are k (1 - 1/G) per token
            # whatever the placement (homes uniform), so the traffic terms only trade balance.
            weights = _replace(weights, traffic=0.0, node=0.0)
        elif kernel == "alltoall" and weights.node:
            weights = _replace(weights, node=0.0)  # no per-node deduplication to exploit
        cluster = Cluster(gpus, nodes, replicas)
        from moeplace.solvers.cost import parse_gpu_speeds

        speeds = None if gpu_speeds is None else parse_gpu_speeds(gpu_speeds, gpus)
        # The evaluator's steps: the decode batch the user solved for, else the trace's own.
        step_tokens = tokens_per_step if phase == "decode" else None
        cur = Placement.load(current) if current else None
        src = _open(source, kw, in_memory_max=0)  # Parquet is streamed, never held in memory
        trace = None if isinstance(src, RoutingStats) else src
        picked = None
        if asked_phase is not None and trace is not None:
            # Only the phase's tokens from here on: fit, holdout split, scoring, plot.
            picked = select_phase(trace, asked_phase)
            trace = picked.source
        if holdout is not None and trace is None:
            raise InputError(source, "format", "--holdout needs per-token routing",
                             "give a trace, not statistics")
        if plot_path and trace is None:
            raise InputError(source, "format", "--plot needs per-token routing",
                             "give a trace, not statistics")
        fit: Any = trace
        held: Any = None
        if holdout is not None:
            held = held_requests(trace, holdout, seed)  # the same split as Trace.split_requests

            def fit() -> Any:
                return split_stream(trace, held, "fit")
        # The static engines' stand-in objective with replicas is the co-activation spread.
        stats = src if trace is None else compute_stats(
            fit() if callable(fit) else fit,
            coactivation=weights.coact > 0 or (engine != "exflow" and replicas > 0))
        held_tokens = 0 if trace is None else trace.num_tokens - stats.num_tokens
        if holdout is not None and (stats.num_tokens == 0 or held_tokens == 0):
            raise InputError(source, "request", "a holdout split needs requests on both sides "
                             f"(fit {stats.num_tokens:,} tokens, held out {held_tokens:,})",
                             "record more requests, change --holdout or --seed, or drop --holdout")
        check_request(stats, cluster, time_limit, cur)
        if picked is not None:  # notes come after the checks, as the kernel's below
            click.echo(f"moeplace: note: {picked.note(source)}", err=True)
        elif asked_phase is not None:
            click.echo(f"moeplace: note: {source}: statistics carry no phase, so all "
                       f"{stats.num_tokens:,} tokens are used for --phase {asked_phase}", err=True)
        if kernel == "deepep-ll":
            # After the input and the request are checked, so that bad input stays one line.
            click.echo("moeplace: note: dispatch deepep-ll sends one copy per (token, expert), "
                       "so co-locating experts does not pay; optimising balance only (received "
                       "copies, per-step active experts with --phase decode)", err=True)
        if num_groups is None:  # the model's n_group, else 1 (as vLLM and SGLang run EPLB)
            num_groups = default_groups(stats, model_shape)
        # One budget: solving, bounds and scoring end by the deadline (+ a margin), after the
        # time reading and counting took.
        deadline = started + time_limit
        left = deadline - time.monotonic()
        if left < 0.2 * time_limit:
            raise TimeLimitError(f"reading and counting {source} took {time_limit - left:.1f} s "
                                 f"of --time-limit {time_limit:g}; raise --time-limit")
        # The baselines compared against come first: they are cheap, and the solver must not
        # spend the time they need (under load they were once skipped, or the start cut short).
        # The deadline only guards against huge inputs: whatever --time-limit is, baselines
        # get 3 s, which small ones never need (EPLB-distinct of 8 layers: 0.8 CPU s).
        base: dict[str, Any] = {}
        skipped: list[str] = []
        base_deadline = max(deadline, time.monotonic() + 3.0)
        for name in _baselines_for(cluster):
            if name != method:
                try:
                    base[name] = baseline(name, stats, cluster, num_groups=num_groups,
                                          deadline=base_deadline)
                except TimeLimitError:
                    skipped.append(name)
        left = max(deadline - time.monotonic(), 0.05 * time_limit)
        solve_limit = 0.75 * left if show_pareto else left
        sim = _simulation(model_shape, hardware, trace)
        if trace is not None:  # keep up to 30% of the budget for scoring per token
            solve_limit -= min(0.3 * left, scoring_seconds(
                trace.num_tokens, stats.num_layers, 3, sim is not None))
        plc, rep = solve_with_report(stats, cluster, method=method, weights=weights,
                                     time_limit=solve_limit, balance_slack=balance_slack,
                                     current=cur, seed=seed, num_groups=num_groups,
                                     restarts=restarts, respect_groups=respect_groups,
                                     restart_runner=runner, engine=engine, phase=phase,
                                     tokens_per_step=tokens_per_step, gpu_speeds=speeds,
                                     kernel=kernel, sim=sim)
        plc.info["report"] = rep.as_dict()
        if asked_phase is not None:  # the instance it is for: export checks it (--prefill/--decode)
            plc.info.update(phase=asked_phase, dispatch=kernel)
        plcs = {rep.method: plc, **{n: p for n, p in base.items() if n != rep.method}}
        front = None
        if show_pareto:
            slacks = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
            per = max(deadline - time.monotonic(), 0.7) / len(slacks)
            front = pareto(stats, cluster, slacks, weights=weights, time_limit=per, seed=seed,
                           num_groups=num_groups)
        scoring: dict[str, Any] = {}
        hold_rows = None
        if trace is None:
            fit_rows = _metric_rows(plcs, None, stats, window, speeds=speeds)
        else:
            # Scoring may use the margin the solver kept; it ends 3 s past the deadline at most.
            end = deadline + 3.0
            share = stats.num_tokens / max(trace.num_tokens, 1)
            fit_end = time.monotonic() + (end - time.monotonic()) * share
            rep_fit = score_placements(trace, plcs, total_tokens=stats.num_tokens,
                                       num_layers=stats.num_layers, window=window,
                                       deadline=fit_end, seed=seed, sim=sim,
                                       tokens_per_step=tokens_per_step, step_tokens=step_tokens,
                                       gpu_speeds=speeds, kernel=kernel,
                                       split=None if held is None else (held, "fit"))
            fit_rows = _rows(rep_fit.summaries, rep_fit.step_ms, True)
            scoring["fit"] = rep_fit.scoring
            if holdout is not None:
                rep_hold = score_placements(trace, plcs, total_tokens=held_tokens,
                                            num_layers=stats.num_layers, window=window,
                                            deadline=end, seed=seed, sim=sim,
                                            tokens_per_step=tokens_per_step, step_tokens=step_tokens,
                                            gpu_speeds=speeds, kernel=kernel,
                                            split=(held, "holdout"))
                hold_rows = _rows(rep_hold.summaries, rep_hold.step_ms, True)
                scoring["holdout"] = rep_hold.scoring
        if skipped:
            scoring["skipped_baselines"] = skipped
        if out:
            plc.save(out)
        # Gains on the held-out requests when there are some: traffic it was not fitted to.
        gains = strongest_baseline_gains(hold_rows if hold_rows is not None else fit_rows,
                                         rep.method)
        eng = rep.details.get("engine", "exflow")
        head_rows = hold_rows if hold_rows is not None else fit_rows
        headline = rpt.headline(
            head_rows, rep.method, num_nodes=nodes, engine=eng,
            where="holdout" if hold_rows is not None else "fit" if trace is not None else "stats",
            balance="active_experts_imbalance" if phase == "decode" else "load_imbalance_mean",
            no_step="" if "step_ms" in head_rows or trace is None else
            "no simulated step (unknown model: give --model-shape)" if sim is None else
            "no simulated step within --time-limit", skipped=skipped)
        if plot_path:
            ref = "eplb" if rep.method != "eplb" else "eplb-distinct"
            # A baseline the table skipped at the time limit is still drawn (EPLB takes ms).
            drawn = {rep.method: plc, ref: plcs.get(ref) or baseline(ref, stats, cluster,
                                                                    num_groups=num_groups)}
            rpt.plot_against(trace if held is None else lambda: split_stream(trace, held, "holdout"),
                             drawn, plot_path, ours=rep.method, reference=ref, window=window,
                             title=f"{stats.meta.model or source}: {rep.method} vs {ref} on "
                             f"{'held-out requests' if held is not None else 'the fitted trace'}")
        if as_json:
            res: dict[str, Any] = {"report": rep.as_dict(), "fit": fit_rows.to_dict("records"),
                                   "cluster": {"num_gpus": gpus, "num_nodes": nodes,
                                               "replicas": replicas}, "out": out,
                                   "scoring": scoring, "dispatch": kernel,
                                   "headline": headline}
            if hold_rows is not None:
                res["holdout"] = hold_rows.to_dict("records")
            if picked is not None:
                res["phase"] = picked.as_dict()
            if front is not None:
                res["pareto"] = [{k: v for k, v in r.items() if k != "placement"} for r in front]
            if len(gains):
                res["vs_strongest_baseline"] = gains.to_dict("records")
            if cur is not None:
                res["migration"] = _migration_table(plcs, cur, expert_bytes).to_dict("records")
            _echo_json(res)
            return
        b = rep.bound
        click.echo(headline + "\n")
        shape = {"num_gpus": gpus, "num_nodes": nodes, "num_layers": stats.num_layers,
                 "all_metrics": all_metrics}
        click.echo(f"dispatch: {kernel}")
        click.echo(f"method {rep.method} ({rep.status}) in {rep.seconds:.2f} s on {gpus} GPUs"
                   f"{f' in {nodes} nodes' if nodes > 1 else ''}"
                   f"{f' with {replicas} replicas per layer' if replicas else ''}")
        click.echo(rpt.bound_line(rep.objective, b, rep.gap, weights, nodes, replicas))
        kernel_line = rpt.kernel_line(rep.objective, b, replicas, nodes,
                                      None if sim is None else sim[0].name, tokens_per_step)
        if kernel_line:
            click.echo(kernel_line)
        if rep.heldout is not None:
            from moeplace.solvers.heldout import describe

            click.echo(describe(rep.heldout, plc.num_layers))
        label = "fitted trace" if holdout is not None else "trace"
        click.echo(f"\n{label} ({'per-token evaluator' if trace is not None else 'statistics'}"
                   f"{_scored_note(scoring.get('fit'))}):")
        _print_metrics(fit_rows, **shape)
        if hold_rows is not None:
            click.echo(f"\nheld-out requests ({held_tokens:,} tokens"
                       f"{_scored_note(scoring.get('holdout'))}):")
            _print_metrics(hold_rows, **shape)
        if skipped:
            click.echo(f"\nnot compared (time limit reached): {', '.join(skipped)}")
        if front is not None:
            click.echo("\ntraffic-versus-balance frontier (search):")
            _print_table(pd.DataFrame([{k: v for k, v in r.items() if k != "placement"}
                                       for r in front]))
        if len(gains):
            click.echo(f"\n{rep.method} against the strongest baseline on each metric (lower is "
                       "better; change < 0 is a gain):")
            _print_metrics(gains, like=head_rows, **shape)
        if cur is not None:
            click.echo(f"\nmigration from {current}:")
            _print_metrics(_migration_table(plcs, cur, expert_bytes), **shape, current=True,
                           expert_bytes=expert_bytes)
        if out:
            click.echo(f"\nwrote {out}")
        if plot_path:
            click.echo(f"wrote {plot_path}")


def _print_metrics(df: pd.DataFrame, like: pd.DataFrame | None = None, *,
                   all_metrics: bool = False, **kw: Any) -> None:
    """A metric table without the columns that cannot differ here, and a note naming them
    (``solvers.report.hidden_columns``). ``like``: the table of placements the rule is judged
    on when ``df`` is another view of it (the per-layer table; the gains table, whose rows are
    metrics)."""
    from moeplace.solvers.report import Hidden, hidden_columns

    gains = "metric" in df.columns
    names = list(df["metric"]) if gains else list(df.columns)
    h = Hidden() if all_metrics else hidden_columns(names, rows=df if like is None else like,
                                                     **kw)
    _print_table(df[~df["metric"].isin(h.columns)] if gains else df.drop(columns=list(h.columns)))
    if h.note() and not gains:
        click.echo(h.note())


def _migration_table(plcs: dict[str, Any], cur: Any, expert_bytes: int) -> pd.DataFrame:
    """Metric 5 for every placement in the table, from the placement serving now."""
    from moeplace.solvers import migration

    return pd.DataFrame([{"placement": name, **migration(p, cur, expert_bytes)}
                         for name, p in plcs.items()])


def _scored_note(info: dict[str, Any] | None) -> str:
    """', scored a seeded sample of ...' when scoring did not cover every token."""
    if not info or info["tokens_scored"] >= info["tokens_in_trace"]:
        return ""
    why = "stopped at the time limit" if info["stopped_at_deadline"] else "to fit --time-limit"
    return (f"; scored {info['tokens_scored']:,} of {info['tokens_in_trace']:,} tokens: whole "
            f"{info['sample_unit']} sampled with seed {info['sample_seed']} at rate "
            f"{info['sample_fraction']:.3g}, {why}")


# ---- export ---------------------------------------------------------------------------------
@main.command()
@click.argument("placement", required=False)
@click.option("--format", "fmt", required=True, type=click.Choice(
    ["sglang", "sglang-logical-count", "trtllm", "vllm-ascend", "vllm-pr49572", "vllm-pr41141",
     "eplb"]))
@click.option("--out", type=click.Path(dir_okay=False),
              help="File to write (SGLang: .json, or .pt for a torch file; trtllm: .yaml).")
@click.option("--prefill", "prefill", type=click.Path(dir_okay=False),
              help="Prefill-decode disaggregation (SGLang): the prefill instance's placement "
              "(solve --phase prefill), with --decode and --out-dir instead of PLACEMENT and "
              "--out.")
@click.option("--decode", "decode", type=click.Path(dir_okay=False),
              help="The decode instance's placement (solve --phase decode); same model, any "
              "GPU count.")
@click.option("--out-dir", type=click.Path(file_okay=False),
              help="New directory for --prefill/--decode: prefill.json and decode.json, and "
              "each instance's launch line printed (--disaggregation-mode, --deepep-mode).")
@click.option("--config", "config_path", type=click.Path(),
              help="The model's Hugging Face config.json: MoE layer ids and hidden-layer count "
              "are checked against it (a mismatch is refused).")
@click.option("--model-shape", help="A known model instead of --config (deepseek-v3, kimi-k2, "
              "deepseek-v2-lite, qwen3-30b-a3b, mixtral-8x7b, flame-moe-290m, ...).")
@click.option("--num-hidden-layers", type=_Number(int, 1, MAX_LAYER_IDS),
              help="SGLang: all hidden layers, dense included "
              "(default: from --config/--model-shape, else last MoE layer + 1).")
@click.option("--moe-layers", help="Hidden-layer ids of the MoE layers (default: from the "
              "placement).")
@click.option("--stats", "stats_source", help="sglang-logical-count: the trace or statistics "
              "whose counts to write.")
@click.option("--gpus", type=POS_INT, help="The deployment's GPUs (expert-parallel size); a "
              "placement for another count is refused.")
@click.option("--nodes", type=POS_INT, help="The deployment's nodes (checked likewise).")
@click.option("--replicas", type=NONNEG_INT, help="The deployment's extra slots per layer "
              "(SGLang's --ep-num-redundant-experts; checked likewise).")
@_paths(inputs=("placement", "stats_source", "config_path", "prefill", "decode"),
        outputs={"out": False, "out_dir": True})
def export(placement: str | None, fmt: str, out: str | None, prefill: str | None,
           decode: str | None, out_dir: str | None, config_path: str | None,
           model_shape: str | None, num_hidden_layers: int | None, moe_layers: str | None,
           stats_source: str | None, gpus: int | None, nodes: int | None,
           replicas: int | None) -> None:
    """Write PLACEMENT (moeplace JSON) in a serving stack's format and print how to load it;
    or, with --prefill and --decode, both instances of a prefill-decode disaggregated SGLang
    deployment into --out-dir."""
    from moeplace.models import from_hf_config, guess_model, known_layout
    from moeplace.placement import Placement, export_placement

    pd = prefill is not None or decode is not None or out_dir is not None
    if pd:
        _check_pd_request(placement, out, prefill, decode, out_dir, stats_source, gpus, nodes,
                          replicas)
    elif placement is None or out is None:
        raise InputError("export", "PLACEMENT" if placement is None else "--out", "missing",
                         "give PLACEMENT and --out FILE, or --prefill, --decode and --out-dir")
    first = prefill if pd else placement
    assert first is not None  # checked above
    plc = Placement.load(first)
    if config_path and model_shape:
        raise InputError("export", "--config", "given together with --model-shape",
                         "pass one of them")
    layout = (from_hf_config(config_path) if config_path
              else known_layout(model_shape) if model_shape else None)
    guessed = guess_model(str(plc.info.get("model", "")))
    if layout is None and guessed is not None:
        # The placement names a known model: its ids must be that model's MoE layers.
        cand = known_layout(guessed)
        if cand.num_experts == plc.num_experts:
            layout = cand
    if pd:
        from moeplace.placement.exports import export_disaggregated

        assert decode is not None and out_dir is not None  # checked above
        flags = export_disaggregated(plc, Placement.load(decode), out_dir, fmt=fmt,
                                     num_hidden_layers=num_hidden_layers,
                                     moe_layer_ids=_layer_ids(moe_layers), layout=layout)
        checked = f" (layer ids checked against {layout.name})" if layout is not None else ""
        click.echo(f"wrote {out_dir}: prefill.json, decode.json{checked}\n{flags}")
        return
    load = None
    if stats_source:
        st, _ = _stats_of(stats_source)
        load = st.load
        if load.shape != (plc.num_layers, plc.num_experts):
            raise InputError(stats_source, "load", f"shape {load.shape} differs from the "
                             f"placement's {(plc.num_layers, plc.num_experts)}",
                             "pass statistics of the placed model")
    flags = export_placement(plc, fmt, out, num_hidden_layers=num_hidden_layers,
                             moe_layer_ids=_layer_ids(moe_layers), load=load, layout=layout,
                             num_gpus=gpus, num_nodes=nodes, replicas=replicas)
    checked = f" (layer ids checked against {layout.name})" if layout is not None else ""
    click.echo(f"wrote {out}{checked}\n{flags}")


def _check_pd_request(placement: str | None, out: str | None, prefill: str | None,
                      decode: str | None, out_dir: str | None, stats_source: str | None,
                      gpus: int | None, nodes: int | None, replicas: int | None) -> None:
    """One line for a disaggregated export asked for with a missing or a foreign flag."""
    fix = "give --prefill P.json --decode D.json --out-dir DIR, without PLACEMENT or --out"
    for flag, value in (("PLACEMENT", placement), ("--out", out)):
        if value is not None:
            raise InputError("export", flag, "given with --prefill/--decode/--out-dir", fix)
    for flag, value in (("--prefill", prefill), ("--decode", decode), ("--out-dir", out_dir)):
        if value is None:
            raise InputError("export", flag, "missing for a prefill-decode export", fix)
    for flag, value in (("--stats", stats_source), ("--gpus", gpus), ("--nodes", nodes),
                        ("--replicas", replicas)):
        if value is not None:
            raise InputError("export", flag, "names one deployment; the prefill and decode "
                             "instances are two, each placed for its own GPUs",
                             f"drop {flag}, or check each placement with export PLACEMENT {flag}")


# ---- apply --------------------------------------------------------------------------------
@main.command()
@click.argument("placement", required=False)
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False),
              help="Safetensors checkpoint directory (save_pretrained layout).")
@click.option("--out", required=True, type=click.Path(), help="New directory to write.")
@click.option("--invert", is_flag=True, help="Undo an earlier apply (reads its sidecar).")
@click.option("--moe-layers", help="Hidden-layer ids of the placement's layers (default: the "
              "placement's, else the checkpoint's MoE layers).")
@_paths(inputs=("placement", "checkpoint"), outputs={"out": True})
def apply(placement: str | None, checkpoint: str, out: str, invert: bool,
          moe_layers: str | None) -> None:
    """Rewrite a checkpoint so contiguous expert parallelism realises PLACEMENT.

    Serving the result with the default expert-parallel layout (vLLM linear, SGLang trivial,
    transformers EP, Megatron) puts exactly the planned experts on each GPU; the model's
    outputs do not change.
    """
    from moeplace.placement import Placement
    from moeplace.placement.checkpoint import rewrite_checkpoint
    from moeplace.placement.exports import apply_launch_hint

    if invert and placement:
        raise InputError("apply", "PLACEMENT", "--invert takes no placement",
                         "the checkpoint's sidecar says what to undo")
    plc = Placement.load(placement) if placement else None
    rewrite_checkpoint(checkpoint, out, plc, invert=invert, moe_layer_ids=_layer_ids(moe_layers))
    if invert:
        click.echo(f"wrote {out}: the original expert order restored")
    else:
        assert plc is not None
        click.echo(f"wrote {out}: {plc.num_layers} MoE layers permuted for {plc.num_gpus} GPUs\n"
                   f"serve it with contiguous expert parallelism over {plc.num_gpus} ranks, no "
                   "placement file and no online rebalancing (it would move experts again):\n"
                   + apply_launch_hint(plc, out))


# ---- demo ---------------------------------------------------------------------------------
@main.command()
@click.option("--gpus", type=POS_INT, default=8, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the placement JSON.")
@click.option("--all-metrics", is_flag=True, help="Print every metric column, also those that "
              "cannot differ here (node metrics on one node, ...).")
@_paths(outputs={"out": False})
def demo(gpus: int, out: str | None, all_metrics: bool) -> None:
    """Analyse the bundled FLAME-MoE-290M trace, solve a placement, and show its gain."""
    from moeplace.solvers import Cluster, solve_with_report
    from moeplace.solvers.report import headline
    from moeplace.solvers.solve import baseline
    from moeplace.traces import analysis, compute_stats, read_trace
    from moeplace.traces.demo import demo_trace_path

    whole = read_trace(demo_trace_path())
    # Fit on all requests but the last, score on that one: gains are stated on traffic the
    # placement was not fitted to.
    req = whole.request_ids()
    last = req == req.max()
    tr, held = whole.select(~last), whole.select(last)
    st = compute_stats(tr)
    summ = analysis.summary(st)
    L, N = st.num_layers, st.num_experts
    lines = [f"{tr.meta.model}: {whole.num_tokens:,} tokens x {L} MoE layers x top-{tr.top_k} "
             f"of {N} experts (bundled real trace)"]
    lines.append(f"routing: expert load max/mean {summ['expert_load_ratio_mean']:.2f} (mean "
                 f"over layers); a token's experts at consecutive layers share "
                 f"{summ['mi_next_bits_median']:.2f} bits (median mutual information)")
    # Three fitted requests are too few for the search's own check of balance on held-back
    # requests (it would keep EPLB's layout), so the demo grants it 2% of fitted balance.
    slack = 0.02
    plc, rep = solve_with_report(st, gpus, time_limit=20, balance_slack=slack)
    plcs = {"moeplace": plc}
    for name in _baselines_for(Cluster(gpus)):
        plcs[name] = baseline(name, st, Cluster(gpus))
    # Priced as solve prices it: SGLang's prefill kernel on the fitted h800-ib profile.
    sim = _simulation("flame-moe-290m", "h800-ib", held)
    df = _metric_rows(plcs, held, st, 512, sim, 512, kernel="deepep-normal")
    # The verdict first, on the held-out request; then what it rests on.
    click.echo(headline(df, "moeplace", where="holdout-one", subject="moeplace's placement")
               + "\n")
    click.echo("\n".join(lines))
    click.echo(f"\nplacements on {gpus} GPUs for {rep.details.get('engine')} (static home, "
               f"DeepEP dispatch), fitted on {int((~last).sum()):,} tokens of "
               f"{len(np.unique(req)) - 1} requests with --balance-slack {slack:g} (too few "
               "requests for the held-back balance check), scored per token on the "
               f"{int(last.sum()):,} tokens of the held-out request (lower is better; speedup "
               "is the simulated step time (h800-ib, DeepEP normal dispatch) of the fastest baseline over each "
               "placement's):")
    shape = {"num_gpus": gpus, "num_nodes": 1, "num_layers": L, "all_metrics": all_metrics}
    _print_metrics(df, **shape)
    gains = strongest_baseline_gains(df, "moeplace")
    click.echo(f"\nmoeplace ({rep.method}, {rep.seconds:.1f} s, gap to lower bound {rep.gap:.1%}) "
               "against the strongest baseline on each metric (change < 0 is a gain):")
    _print_metrics(gains, like=df, **shape)
    click.echo("\nplacement, first two MoE layers (GPU: experts):")
    for l in range(min(2, L)):
        click.echo(f"  layer {tr.meta.moe_layer_ids[l]}: " + "  ".join(
            f"{g}:{','.join(map(str, sorted(ex)))}" for g, ex in enumerate(plc.gpu_experts(l))))
    if out:
        plc.save(out)
        click.echo(f"wrote {out}")


# ---- the placement service (moeplace serve) and its client verbs ---------------------------
def _service_token(token_file: str | None) -> str | None:
    """The bearer token: ``--token-file`` (first line), else ``$MOEPLACE_TOKEN``, else none."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                tok = fh.read(4096).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(token_file, "token", f"cannot be read ({exc})",
                             "give a readable text file holding the token") from None
        if not tok or len(tok.splitlines()) != 1:
            raise InputError(token_file, "token", "is empty or not one line",
                             "write the token on one line")
        return tok
    return os.environ.get("MOEPLACE_TOKEN") or None


_token_option = click.option("--token-file", type=click.Path(dir_okay=False),
                             help="File holding the bearer token (else $MOEPLACE_TOKEN).")
_service_option = click.option("--service", default="http://127.0.0.1:8750", show_default=True,
                               help="URL of a running moeplace serve.")


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Directory of the service's state (SQLite + statistics files); created.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address (loopback by default; put a TLS proxy in front for others).")
@click.option("--port", type=_Number(int, 1, 65535), default=8750, show_default=True)
@_token_option
@click.option("--window-seconds", type=POS_FLOAT, default=600.0, show_default=True)
@click.option("--retain-windows", type=POS_INT, default=144, show_default=True)
@click.option("--recent-windows", type=POS_INT, default=6, show_default=True)
@click.option("--max-upload-mb", type=POS_FLOAT, default=256.0, show_default=True)
@click.option("--solve-workers", type=_Number(int, 1, 64), default=1, show_default=True,
              help="Solve jobs that run at once (each in its own process).")
@click.option("--resolve-every", type=POS_FLOAT, help="Re-solve each deployment with new "
              "uploads every this many seconds (default: only on request).")
@click.option("--resolve-time-limit", type=POS_FLOAT, default=60.0, show_default=True)
def serve(data: str, host: str, port: int, token_file: str | None, window_seconds: float,
          retain_windows: int, recent_windows: int, max_upload_mb: float,
          solve_workers: int, resolve_every: float | None, resolve_time_limit: float) -> None:
    """Run the placement service (FastAPI on uvicorn) over the state in --data."""
    try:
        import uvicorn

        from moeplace.service.app import create_app
    except ImportError:
        from moeplace.errors import MissingDependencyError

        raise MissingDependencyError("fastapi and uvicorn", "moeplace serve", "service") from None
    from moeplace.service.store import Policy, Store

    token = _service_token(token_file)
    policy = Policy(window_seconds, retain_windows, recent_windows)
    store = Store(data, policy)  # a data directory it cannot use fails here, as one line
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"moeplace serve: warning: listening on {host} without a token; anyone who "
                   "reaches the port can change placements", err=True)
    app = create_app(data, token, policy=policy, max_upload=int(max_upload_mb * (1 << 20)),
                     max_workers=solve_workers, opened_store=store, resolve_every=resolve_every,
                     resolve_time_limit=resolve_time_limit)
    click.echo(f"moeplace serve: http://{host}:{port} (data {data}, "
               f"{'token required' if token else 'no token'})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@main.command("push-stats")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_service_option
@click.option("--deployment", required=True, help="Deployment id (its name).")
@click.option("--batch-id", help="Batch id (one file only; default: the file's SHA-256).")
@click.option("--gpus", type=POS_INT, help="Create the deployment from the first file's shape "
              "on this many GPUs if it does not exist.")
@click.option("--nodes", type=POS_INT, default=1, show_default=True)
@click.option("--replicas", type=NONNEG_INT, default=0, show_default=True)
@_token_option
def push_stats(files: tuple[str, ...], service: str, deployment: str, batch_id: str | None,
               gpus: int | None, nodes: int, replicas: int, token_file: str | None) -> None:
    """Upload statistics files (moeplace stats .npz, or Parquet trace shards) to a service."""
    from moeplace.service import Client, ServiceError
    from moeplace.traces import RoutingStats

    if batch_id and len(files) > 1:
        raise InputError("--batch-id", "value", "given for several files",
                         "push one file per --batch-id, or let the content hash name each")
    with Client(service, _service_token(token_file)) as c:
        if gpus is not None:
            try:
                c.deployment(deployment)
            except ServiceError as exc:
                if exc.status != 404:
                    raise
                st = RoutingStats.load_npz(files[0])
                c.create_deployment(deployment, num_layers=st.num_layers,
                                    num_experts=st.num_experts, top_k=st.meta.top_k,
                                    moe_layer_ids=list(st.meta.moe_layer_ids),
                                    num_hidden_layers=st.meta.num_hidden_layers,
                                    model=st.meta.model[:200], num_gpus=gpus, num_nodes=nodes,
                                    replicas=replicas)
                click.echo(f"created deployment {deployment}: {st.num_layers} MoE layers x "
                           f"{st.num_experts} experts, top-{st.meta.top_k}, {gpus} GPUs")
        for f in files:
            r = c.push_stats(deployment, f, batch_id)
            what = "counted" if r["counted"] else "already counted, not again"
            click.echo(f"{f}: {what}: {r['tokens']:,} tokens (batch {r['batch_id'][:16]})")


@main.command("pull-placement")
@_service_option
@click.option("--deployment", required=True, help="Deployment id (its name).")
@click.option("--version", "version", default="latest", show_default=True,
              help="A version number, latest or current.")
@click.option("--format", "fmt", default="sglang", show_default=True,
              type=click.Choice(["moeplace", "sglang", "sglang-logical-count", "trtllm",
                                 "vllm-ascend", "vllm-pr49572", "vllm-pr41141", "eplb"]))
@click.option("--solve", "solve_s", type=POS_FLOAT,
              help="First solve the recent statistics with this time limit (s) and pull that.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@_token_option
@_paths(outputs={"out": False})
def pull_placement(service: str, deployment: str, version: str, fmt: str, solve_s: float | None,
                   out: str, token_file: str | None) -> None:
    """Download a placement from a service in a serving stack's format."""
    from moeplace._fileio import atomic_path
    from moeplace.service import Client, ServiceError

    with Client(service, _service_token(token_file)) as c:
        if solve_s is not None:
            job = c.solve(deployment, time_limit=solve_s)
            click.echo(f"solving {deployment} (job {job['job']}, time limit {solve_s:g} s)", err=True)
            j = c.wait(job["job"], timeout=solve_s + 300)
            if j["state"] != "done":
                raise ServiceError(0, f"job {j['job']} {j['state']}: {j['error']}")
            version = str(j["version"])
        v, data = c.placement(deployment, version, fmt)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    click.echo(f"wrote {out}: {deployment} placement version {v} ({fmt})")



@main.command()
@click.option("--sglang", required=True, help="URL of the SGLang server to record.")
@click.option("--dump-dir", type=click.Path(file_okay=False),
              default=lambda: os.environ.get("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", "/tmp"),
              show_default="$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR or /tmp",
              help="Where that SGLang server writes its dumps (the collector runs on its host).")
@_service_option
@click.option("--deployment", required=True, help="Deployment id (its name).")
@click.option("--every", type=POS_FLOAT, default=60.0, show_default=True, help="Seconds between dumps.")
@click.option("--cycles", type=POS_INT, help="Stop after this many dumps (default: run until stopped).")
@click.option("--ranks", default="0", show_default=True,
              help="per_token dumps: ranks to upload, comma-separated, or 'all' (data-parallel "
                   "attention: every rank has its own tokens). stat dumps are always uploaded.")
@click.option("--no-start", is_flag=True, help="Do not (re)start SGLang's recorder first.")
@click.option("--keep", is_flag=True, help="Keep dumps after they are uploaded.")
@click.option("--sglang-api-key", envvar="SGLANG_API_KEY", help="SGLang's --api-key, if set.")
@_token_option
def collect(sglang: str, dump_dir: str, service: str, deployment: str, every: float,
            cycles: int | None, ranks: str, no_start: bool, keep: bool,
            sglang_api_key: str | None, token_file: str | None) -> None:
    """Upload SGLang expert-distribution dumps to a placement service, one every --every s."""
    from moeplace.service import Client
    from moeplace.service.collect import collect as run

    with Client(service, _service_token(token_file)) as c:
        c.deployment(deployment)  # a wrong id fails now, as one line, not after the first dump
        rep = run(sglang, dump_dir, c, deployment, every=every, cycles=cycles,
                  ranks=None if ranks.strip() == "all" else [r.strip() for r in ranks.split(",")],
                  start=not no_start, keep=keep, sglang_api_key=sglang_api_key,
                  log=lambda m: click.echo(m, err=True))
    click.echo(f"{rep.cycles} dumps: {len(rep.uploaded)} uploaded ({rep.tokens:,} tokens), "
               f"{len(rep.duplicates)} already counted, {len(rep.rejected)} refused, "
               f"{len(rep.errors)} errors")
    if rep.rejected or rep.errors:
        sys.exit(1)

# ---- simulate -------------------------------------------------------------------------------
@main.command()
@click.option("--hardware", default="h800-ib", show_default=True,
              help="Profile: h800-ib (fitted to DeepEP's V1 tables), h100-nvlink, h100-ib or FILE.json.")
@click.option("--kernel", default="deepep-ll", show_default=True,
              type=click.Choice(["alltoall", "deepep-normal", "deepep-ll", "deepep-v2"]),
              help="Dispatch kernel whose counting rule and fitted time are used.")
@click.option("--ep", type=_Number(int, 1, 4096), default=8, show_default=True, help="Expert-parallel ranks.")
@click.option("--tokens", type=_Number(int, 1, 1 << 16), default=128, show_default=True,
              help="Tokens per rank.")
@click.option("--hidden", type=_Number(int, 1, 1 << 16), default=7168, show_default=True)
@click.option("--top-k", type=_Number(int, 1, 64), default=8, show_default=True)
@click.option("--experts", type=_Number(int, 1, 1 << 14), default=256, show_default=True,
              help="Experts (uniform random routing as DeepEP's tests, contiguous on ranks).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def simulate(hardware: str, kernel: str, ep: int, tokens: int, hidden: int, top_k: int,
             experts: int, seed: int, as_json: bool) -> None:
    """Price one dispatch and combine of a kernel (DeepEP's counting rules, fitted profile)."""
    from moeplace._limits import check_memory
    from moeplace.solvers.dispatch import simulate as run
    from moeplace.solvers.simulator import Hardware
    check_memory(8.0 * ep * tokens * (experts + 4 * top_k), "the simulated routing", "simulate",
                 "--tokens")
    res = run(kernel, ep, tokens, hidden, top_k, Hardware.load(hardware), num_experts=experts,
              seed=seed)
    if as_json:
        _echo_json(res)
        return
    click.echo(f"profile {res['hardware']}: {res['profile_fit']}")
    click.echo(f"{kernel} EP{ep} ({res['nodes']} nodes), {tokens} tokens per rank, hidden "
               f"{hidden}, top-{top_k}")
    for st in ("dispatch", "combine"):
        click.echo(f"  {st}: {res[st + '_us']:.1f} us (slowest rank {res[st + '_max_us']:.1f} us), "
                   f"{res[st + '_bandwidth_gbps']:.1f} GB/s")
    click.echo(f"  copies per token: nvlink {res['nvlink_copies_per_token']:.2f}, rdma "
               f"{res['rdma_copies_per_token']:.2f}")


# ---- replay (issue 19) -----------------------------------------------------------------------
@main.command()
@click.argument("trace")
@click.option("--gpus", type=POS_INT, required=True, help="GPUs (EP ranks).")
@click.option("--nodes", type=POS_INT, default=1, show_default=True, help="Nodes (divides --gpus).")
@click.option("--replicas", type=NONNEG_INT, default=0, show_default=True,
              help="Redundant expert slots per layer (experts + replicas divides over --gpus).")
@click.option("--groups", type=POS_INT, help="The model's expert groups (n_group; default 1: "
              "EPLB's global policy).")
@click.option("--interval", type=POS_INT, default=4096, show_default=True,
              help="Tokens between two rebalancing decisions (each scored on the next interval).")
@click.option("--window", type=POS_INT, help="Tokens of the sliding window the engines refit on "
              "(default: --interval).")
@click.option("--policy", "policies", default="moeplace,eplb,never", show_default=True,
              help="Policies to replay side by side, comma separated: moeplace, vllm, sglang "
              "(the installed engine's own algorithm, refused if it cannot be imported), eplb, "
              "eplb-cumulative, static, never.")
@click.option("--order", type=click.Choice(["arrival", "step", "file"]), default="arrival",
              show_default=True, help="Replay order: arrival (request, then position), step "
              "(serving step ids), file (as stored).")
@click.option("--expert-bytes", type=_Number(int, 0, 1 << 40), default=0, show_default=True,
              help="Bytes of one expert's weights (bytes moved and the stall estimate).")
@click.option("--hardware", default="h100-nvlink", show_default=True,
              help="Hardware profile for the stall (h100-nvlink, h100-ib, h800-ib or a JSON file).")
@click.option("--out", type=click.Path(), help="New directory: placements.jsonl (one line per "
              "interval; POLICY/placements.jsonl with several policies) and summary.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and every interval as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=_plot_path,
              help="Save imbalance and moved copies over time to this image file.")
@click.option("--phase", type=click.Choice(["prefill", "decode"]),
              help="Replay one instance of a disaggregated deployment: only this phase's tokens "
              "(traces with a phase column; otherwise all, said so). Default: every token.")
@import_options
@_paths(inputs=("trace",), outputs={"out": True, "plot_path": False})
def replay(trace: str, gpus: int, nodes: int, replicas: int, groups: int | None, interval: int,
           window: int | None, policies: str, order: str, expert_bytes: int, hardware: str,
           out: str | None, as_json: bool, plot_path: str | None, phase: str | None,
           **kw: Any) -> None:
    """Replay TRACE as an engine runs online EPLB: every --interval tokens each policy picks
    the map for the next interval from what it has seen; score that interval."""
    from moeplace.integrations.engine_policies import run_replay
    from moeplace.solvers.replay import replay_headline, summary_table
    from moeplace.traces import RoutingStats

    src = _open(trace, kw, in_memory_max=0)  # Parquet is streamed
    if isinstance(src, RoutingStats):
        raise InputError(trace, "format", "aggregated counts have no token order to replay",
                         "give a per-token trace")
    picked = None
    if phase is not None:
        from moeplace.traces import select_phase

        picked = select_phase(src, phase)
        src = picked.source
    res = run_replay(src, policies, num_gpus=gpus, num_nodes=nodes, replicas=replicas,
                     num_groups=groups, interval=interval, window=window, order=order,
                     expert_bytes=expert_bytes, hardware=hardware, out=out, plot_path=plot_path,
                     phase=picked)
    if picked is not None:  # after the replay's checks: bad input stays one line
        click.echo(f"moeplace: note: {picked.note(trace)}", err=True)
    if as_json:
        _echo_json({"headline": replay_headline(res), **res.to_dict()})
        return
    st = res.setup
    click.echo(replay_headline(res) + "\n")
    click.echo(f"{st['trace']}: {st['tokens']:,} tokens in {order} order, {st['intervals']} "
               f"intervals of {interval:,} (window {st['window']:,}); {gpus} GPUs, "
               f"{nodes} node{'s' if nodes > 1 else ''}, {replicas} replicas")
    for n, s in res.sources.items():
        click.echo(f"  {n}: {s}")
    lr = st["link_rates"]
    click.echo(f"  stall: {lr['nvlink_bytes_per_s']['value'] / 1e9:g} GB/s in a node "
               f"({lr['nvlink_bytes_per_s']['source']}), {lr['network_bytes_per_s']['value'] / 1e9:g}"
               f" GB/s x {lr['network_efficiency']['value']:g} across nodes; profile "
               f"{st['hardware_source']}")
    _print_table(pd.DataFrame(summary_table(res)), "{:.4f}")
    for extra in (out, plot_path):
        if extra:
            click.echo(f"wrote {extra}")


if __name__ == "__main__":  # pragma: no cover
    main()
