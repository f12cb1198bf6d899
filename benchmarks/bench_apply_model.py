"""apply_to_model on real devices: outputs against the unmodified model and the forward time it adds.

A Qwen3-MoE-shaped model with random weights (the profiler benchmark's shape: hidden 1024, 4 MoE
layers of 64 experts, top-8) runs unmodified on ``--device``; a copy gets a random 4-GPU placement
through ``apply_to_model`` with every part on that device (what a one-GPU box can show: the
split-and-gather path of a placed layer, not inter-GPU links) and, when a GPU is present, a
GPU/CPU mix. Prints logits' max difference, greedy generate() agreement and median forward time.

    python benchmarks/bench_apply_model.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moeplace.placement import apply_to_model, random_placement


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, dev: str, reps: int) -> float:
    fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    cfg = Qwen3MoeConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
                         decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    ref = Qwen3MoeForCausalLM(cfg).to(dtype).eval()
    placed = copy.deepcopy(ref)
    ref.to(dev)
    plc = random_placement(4, 64, 4, seed=3, moe_layer_ids=(0, 1, 2, 3))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor()
    print(f"Command: `python benchmarks/bench_apply_model.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {name or platform.machine()}, torch {torch.__version__}, {dtype}; batch "
          f"{args.batch} x {args.seq}, random placement over 4 GPUs, median of {args.reps}.\n")
    print("| devices of the 4 GPUs | apply s | max abs logit diff | greedy tokens equal | "
          "forward ms | unmodified ms |")
    print("|---|---|---|---|---|---|")
    layouts = [[dev] * 4]
    if dev.startswith("cuda"):
        layouts.append([dev, "cpu", dev, "cpu"])
    with torch.no_grad():
        want = ref(ids).logits.float()
        short = ids[:2, :32]
        want_gen = ref.generate(input_ids=short, max_new_tokens=16, do_sample=False)
        base_ms = _median_ms(lambda: ref(ids), dev, args.reps)
        for devices in layouts:
            model = copy.deepcopy(placed)
            t0 = time.perf_counter()
            dmap = apply_to_model(model, plc, devices, main_device=dev)
            _sync(dev)
            secs = time.perf_counter() - t0
            got = model(ids).logits.float()
            diff = (got.to(want.device) - want).abs().max().item()
            gen = model.generate(input_ids=short.to(dmap[""]), max_new_tokens=16, do_sample=False)
            same = bool(torch.equal(gen.cpu(), want_gen.cpu()))
            ms = _median_ms(lambda m=model: m(ids), dev, args.reps)
            print(f"| {', '.join(devices)} | {secs:.2f} | {diff:.3g} | {same} | {ms:.2f} | "
                  f"{base_ms:.2f} |")
            del model
    print("\nbf16 logits differ from the unmodified model by summation order only (the placed "
          "layer adds each part's weighted outputs in another order); float32 on CPU agrees to 1e-5 "
          "(tests/placement/test_in_memory.py).")


if __name__ == "__main__":
    main()
