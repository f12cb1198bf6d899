"""Profiler overhead: forward time of a mid-size MoE model with and without recording, against
a naive hook that copies each router's indices to the host (``.cpu()``) per layer.

Shape (issue 4): Qwen3-MoE, hidden 1024, 4 layers, 64 experts, top-8, random weights built on
the device, batch 8 x 512. Also a long greedy generation, to show device memory stays flat.

Usage: python benchmarks/bench_profiler.py [--device cuda|cpu] [--dtype bfloat16|float32]
       [--reps 20] [--batch 8] [--seq 512] [--new-tokens 256]
Prints Markdown; the numbers in docs/benchmarks.md come from it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moeplace.profiling import record


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class _NaiveHooks:
    """The baseline the issue quotes: every router's indices to the host, per layer."""

    def __init__(self, model):
        self.rows: list = []
        self.handles = [m.register_forward_hook(lambda mod, a, o: self.rows.append(o[2].cpu()))
                        for n, m in model.named_modules() if n.endswith("mlp.gate")]

    def remove(self):
        for h in self.handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32"))
    cfg = Qwen3MoeConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
                         decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen3MoeForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)

    def fwd():
        with torch.no_grad():
            model(input_ids=ids)

    # Modes take turns rep by rep, so drift (clocks, allocator warm-up) hits them alike.
    times: dict[str, list[float]] = {"none": [], "naive": [], "record": []}
    n_tokens = 0
    for rep in range(args.reps + 1):
        times["none"].append(_timed(fwd, dev))
        naive = _NaiveHooks(model)
        times["naive"].append(_timed(fwd, dev))
        naive.remove()
        with record(model) as rec:
            times["record"].append(_timed(fwd, dev))
        n_tokens += rec.num_tokens
        if rep == 0:  # warm-up round
            for t in times.values():
                t.clear()
    base, with_naive, with_rec = times["none"], times["naive"], times["record"]
    med = statistics.median
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor()
    print(f"Command: `python benchmarks/bench_profiler.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {name or platform.machine()}, torch {torch.__version__}, {dtype}; "
          f"batch {args.batch} x {args.seq}, median of {args.reps}.\n")
    print("| hooks | forward ms (median) | added |")
    print("|---|---|---|")
    for label, t in (("none", base), ("naive .cpu() per layer", with_naive),
                     ("moeplace record()", with_rec)):
        print(f"| {label} | {1e3 * med(t):.2f} | {100 * (med(t) / med(base) - 1):+.1f}% |")
    print(f"\nrecorded {n_tokens:,} tokens x 4 layers x top-8 ({args.reps + 1} forwards; "
          "the recorder's set-up and flush are outside the timed forward).")

    if args.new_tokens:
        short = ids[:, :64]
        with torch.no_grad(), record(model) as rec:
            model.generate(input_ids=short, max_new_tokens=16, do_sample=False,
                           min_new_tokens=16)
            _sync(dev)
            mem0 = torch.cuda.memory_allocated(dev) if dev.startswith("cuda") else 0
            t0 = time.perf_counter()
            model.generate(input_ids=short, max_new_tokens=args.new_tokens, do_sample=False,
                           min_new_tokens=args.new_tokens)
            _sync(dev)
            secs = time.perf_counter() - t0
            mem1 = torch.cuda.memory_allocated(dev) if dev.startswith("cuda") else 0
        print(f"\ngenerate({args.new_tokens} new tokens, batch {args.batch}) under record(): "
              f"{secs:.2f} s, {rec.num_tokens:,} tokens recorded; device memory allocated after "
              f"vs after a 16-token run: {(mem1 - mem0) / 2**20:+.1f} MiB (the recorder's "
              "buffers are sized by the largest forward, not by the generation length).")


if __name__ == "__main__":
    main()
