"""Seeded synthetic routing traces with controllable skew and cross-layer affinity, at any model shape.

Generative model: each token carries a latent "topic" h that persists from layer to layer with
probability ``stickiness`` (else it is redrawn). At layer l a topic selects experts from
``(1 - affinity) * popularity_l + affinity * focus_{l,h}``, where ``popularity_l`` is a Zipf
law of exponent ``skew`` over a random expert order and ``focus_{l,h}`` concentrates on a few
experts. Persistent topics give the cross-layer dependence real traces show; the Zipf law
gives per-layer skew. k distinct experts are drawn per token by Gumbel top-k from a per-topic
pool of precomputed sets, so generation costs O(tokens x layers) and streams in chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moeplace.errors import InputError
from moeplace.models import known_layout
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL, Trace, TraceMeta, expert_dtype


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and routing character of a synthetic model."""

    num_layers: int
    num_experts: int
    top_k: int
    skew: float = 0.6
    affinity: float = 0.7
    stickiness: float = 0.85
    num_topics: int = 64
    focus_size: int | None = None
    pool: int = 128
    model: str = "synthetic"
    moe_layer_ids: tuple[int, ...] | None = None  # hidden-layer ids (default 0..num_layers-1)
    num_hidden_layers: int | None = None
    n_group: int | None = None  # expert groups of group-limited routing (DeepSeek-V3: 8)

    def check(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1:
            raise InputError("synthetic", "shape", "needs at least one layer and one expert",
                             "pass positive sizes")
        if not 1 <= self.top_k <= self.num_experts:
            raise InputError("synthetic", "top_k", f"{self.top_k} not in 1..{self.num_experts}",
                             "top-k must not exceed the expert count")
        for name in ("affinity", "stickiness"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError("synthetic", name, f"{v} not in [0, 1]", "use a fraction")
        if self.skew < 0:
            raise InputError("synthetic", "skew", f"{self.skew} < 0", "use a Zipf exponent >= 0")
        if self.moe_layer_ids is not None and len(self.moe_layer_ids) != self.num_layers:
            raise InputError("synthetic", "moe_layer_ids", f"{len(self.moe_layer_ids)} ids for "
                             f"{self.num_layers} layers", "give one hidden-layer id per layer")


def _from_model(name: str) -> SyntheticSpec:
    m = known_layout(name)
    return SyntheticSpec(m.num_moe_layers, m.num_experts, m.top_k, model=f"synthetic-{m.name}",
                         moe_layer_ids=m.moe_layer_ids, num_hidden_layers=m.num_hidden_layers,
                         n_group=m.n_group)


# Shapes of public models, with their real MoE layer ids and hidden-layer counts
# (DeepSeek-V3: MoE layers 3..60 of 61; see moeplace.models).
PRESETS: dict[str, SyntheticSpec] = {
    "deepseek-v3": _from_model("deepseek-v3"),
    "kimi-k2": _from_model("kimi-k2"),
    "deepseek-v2-lite": _from_model("deepseek-v2-lite"),
    "qwen3-30b-a3b": _from_model("qwen3-30b-a3b"),
    "mixtral": _from_model("mixtral-8x7b"),
    "flame-moe-290m": _from_model("flame-moe-290m"),
}


def preset(name: str, **overrides: float | int | str) -> SyntheticSpec:
    """A preset shape, optionally with changed routing parameters."""
    if name not in PRESETS:
        raise InputError("synthetic", "preset", f"unknown preset {name!r}",
                         f"use one of {sorted(PRESETS)}")
    import dataclasses

    return dataclasses.replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


class SyntheticRouter:
    """Holds one sampled synthetic model; ``sample`` draws tokens from it reproducibly."""

    def __init__(self, spec: SyntheticSpec, seed: int = 0) -> None:
        spec.check()
        self.spec = spec
        self.seed = seed
        rng = np.random.default_rng(seed)
        L, N, k, H = spec.num_layers, spec.num_experts, spec.top_k, spec.num_topics
        ranks = np.arange(1, N + 1, dtype=np.float64)
        pop = np.empty((L, N))
        for l in range(L):
            pop[l, rng.permutation(N)] = ranks ** -spec.skew
        pop /= pop.sum(axis=1, keepdims=True)
        fsize = spec.focus_size or min(N, max(2 * k, N // 8))
        focus = np.zeros((L, H, N))
        for l in range(L):
            for h in range(H):
                members = rng.choice(N, size=fsize, replace=False, p=pop[l])
                focus[l, h, members] = rng.dirichlet(np.full(fsize, 1.0))
        mix = (1 - spec.affinity) * pop[:, None, :] + spec.affinity * focus
        logp = np.log(np.maximum(mix, 1e-300))
        dt = expert_dtype(N)
        self.sets = np.empty((L, H, spec.pool, k), dtype=dt)
        for l in range(L):
            g = logp[l][:, None, :] + rng.gumbel(size=(H, spec.pool, N))
            top = np.argpartition(-g, k - 1, axis=2)[:, :, :k] if k < N else np.argsort(-g, 2)
            # Order each set by its sampled key so position 0 is the "heaviest" expert.
            key = np.take_along_axis(g, top, axis=2)
            self.sets[l] = np.take_along_axis(top, np.argsort(-key, axis=2), axis=2)
        self.topic_prior = rng.dirichlet(np.full(H, 2.0))
        ids = spec.moe_layer_ids if spec.moe_layer_ids is not None else tuple(range(L))
        extra: dict[str, object] = {"synthetic": {"skew": spec.skew, "affinity": spec.affinity,
                                                  "stickiness": spec.stickiness,
                                                  "num_topics": H}}
        if spec.n_group:
            extra["n_group"] = spec.n_group
        self.meta = TraceMeta(num_experts=N, top_k=k, moe_layer_ids=tuple(ids),
                              model=spec.model, num_hidden_layers=spec.num_hidden_layers,
                              source=f"synthetic:{spec.model}:seed={seed}", extra=extra)

    def sample(self, num_tokens: int, *, seed: int | None = None, chunk_tokens: int = 1 << 16,
               mean_request_tokens: int = 256, weights: bool = False,
               prompt_tokens: int | None = None) -> Iterator[Trace]:
        """Yield ``num_tokens`` tokens in chunks; requests are runs of consecutive tokens.

        ``phase``: every token prefill, or with ``prompt_tokens`` the first that many tokens of
        each request prefill and the rest decode (the routing is the same in both phases)."""
        if num_tokens < 1:
            raise InputError("synthetic", "tokens", f"{num_tokens} < 1", "ask for >= 1 token")
        if prompt_tokens is not None and prompt_tokens < 0:
            raise InputError("synthetic", "prompt_tokens", f"{prompt_tokens} < 0",
                             "give a prompt length >= 0")
        spec = self.spec
        L, H, k = spec.num_layers, spec.num_topics, spec.top_k
        rng = np.random.default_rng(self.seed + 1 if seed is None else seed)
        done, req, pos_in_req = 0, 0, 0
        while done < num_tokens:
            n = min(chunk_tokens, num_tokens - done)
            h = np.empty((n, L), dtype=np.int32)
            h[:, 0] = rng.choice(H, size=n, p=self.topic_prior)
            for l in range(1, L):
                keep = rng.random(n) < spec.stickiness
                h[:, l] = np.where(keep, h[:, l - 1], rng.integers(0, H, size=n))
            m = rng.integers(0, spec.pool, size=(n, L))
            experts = self.sets[np.arange(L)[None, :], h, m]
            # Requests: geometric lengths, continued across chunk boundaries.
            starts = rng.random(n) < 1.0 / max(mean_request_tokens, 1)
            starts[0] |= done == 0
            rid = req + np.cumsum(starts) - (1 if done == 0 else 0)
            first_new = np.flatnonzero(starts)
            pos = np.arange(n, dtype=np.int64)
            if first_new.size:
                base = np.zeros(n, dtype=np.int64)
                base[first_new] = first_new
                base = np.maximum.accumulate(base)
                cont = pos < first_new[0]
                pos = np.where(cont, pos + pos_in_req, pos - base)
            else:
                pos = pos + pos_in_req
            req, pos_in_req = int(rid[-1]), int(pos[-1]) + 1
            w = None
            if weights:
                w = np.sort(rng.dirichlet(np.ones(k), size=(n, L)), axis=2)[:, :, ::-1]
                w = w.astype(np.float32)
            phase = (np.full(n, PHASE_PREFILL, np.int8) if prompt_tokens is None else
                     np.where(pos < prompt_tokens, PHASE_PREFILL, PHASE_DECODE).astype(np.int8))
            tokens = {"request": rid.astype(np.int64), "position": pos.astype(np.int32),
                      "phase": phase}
            yield Trace(experts=experts, meta=self.meta, weights=w, tokens=tokens)
            done += n


def synthetic_trace(spec: SyntheticSpec | str, num_tokens: int, seed: int = 0,
                    **kw: bool | int) -> Trace:
    """Generate a whole synthetic trace in memory (use ``SyntheticRouter.sample`` to stream)."""
    if isinstance(spec, str):
        spec = preset(spec)
    return Trace.concat(list(SyntheticRouter(spec, seed).sample(num_tokens, **kw)))  # type: ignore[arg-type]
