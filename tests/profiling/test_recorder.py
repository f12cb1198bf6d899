"""The recorder against each router's own top-k, recomputed independently from its inputs, for
padded batches and generate() with a cache; bookkeeping, hooks and streaming."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.errors import InputError
from moeplace.traces import read_trace
from moeplace.traces.trace import PHASE_DECODE, PHASE_PREFILL
from tests.tiny_models import ARCHS, TOP_K, VOCAB, build, reference_topk

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moeplace.profiling import record  # noqa: E402


def _padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as generate() wants
    mask[1, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


class _RouterInputs:
    """The test's own hooks: every router input, in call order (independent of moeplace)."""

    def __init__(self, model, names):
        self.calls: list[list] = []
        self.handles = []
        for pos, n in enumerate(names):
            self.handles.append(model.get_submodule(n).register_forward_pre_hook(self._hook(pos)))
        self.names = names

    def _hook(self, pos):
        def hook(module, args):
            if pos == 0:
                self.calls.append([])
            self.calls[-1].append((module, args[0].detach().clone()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _expected(arch, config, calls, valid_per_call):
    rows = []
    for call, valid in zip(calls, valid_per_call, strict=True):
        per_layer = [reference_topk(arch, mod, h, config) for mod, h in call]
        rows.append(np.stack(per_layer, axis=1)[valid])
    return np.concatenate(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_experts_equal_router_topk_padded_and_generate(arch):
    model, names = build(arch)
    ids, mask = _padded_batch()
    spy = _RouterInputs(model, names)
    new = 4
    with torch.no_grad(), record(model, weights=True) as rec:
        model(input_ids=ids, attention_mask=mask)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False)
    spy.remove()
    assert out.shape == (3, 7 + new)
    # Call 0: plain forward; call 1: generate's prefill; calls 2..: one token per sequence.
    flat = mask.reshape(-1).bool().numpy()
    valid = [flat, flat] + [np.ones(3, bool)] * (new - 1)
    expected = _expected(arch, model.config, spy.calls, valid)
    tr = rec.trace()
    assert tr.experts.shape == (int(mask.sum()) * 2 + 3 * (new - 1), len(names), TOP_K)
    np.testing.assert_array_equal(np.sort(tr.experts, axis=2), expected)
    assert tr.meta.num_experts == 8 and tr.meta.top_k == TOP_K
    assert tr.weights is not None and np.isfinite(tr.weights).all()
    if arch == "deepseek-v3":
        assert tr.meta.moe_layer_ids == (1, 2)  # layer 0 is dense (first_k_dense_replace)
        assert tr.meta.num_shared_experts == 1
        groups = tr.experts // (8 // 4)
        spread = np.array([[len(set(g)) for g in tok] for tok in groups])
        assert spread.max() <= 2  # topk_group = 2 of n_group = 4


def test_bookkeeping_of_generate_request_position_phase_step():
    model, _ = build("qwen3-moe")
    ids, mask = _padded_batch(1)
    with torch.no_grad(), record(model) as rec:
        rec.set_request_ids([100, 101, 102])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    t = rec.trace().tokens
    lengths = mask.sum(1).tolist()
    for r, n in zip((100, 101, 102), lengths, strict=True):
        sel = t["request"] == r
        # prefill covers the real prompt tokens, then one decode token per step
        np.testing.assert_array_equal(t["position"][sel], np.arange(n + 2))
        np.testing.assert_array_equal(t["phase"][sel], [PHASE_PREFILL] * n + [PHASE_DECODE] * 2)
        np.testing.assert_array_equal(t["step"][sel], [0] * n + [1, 2])


def test_finished_sequences_stop_being_recorded():
    model, _ = build("mixtral")
    ids, mask = _padded_batch(2)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                              do_sample=False)
    eos = int(free[0, 7 + 2])  # row 0 produces this as its third new token (or earlier)
    model.generation_config.eos_token_id = eos
    with torch.no_grad(), record(model) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                             do_sample=False)
    t = rec.trace().tokens
    for row in range(3):
        gen = out[row, 7:].tolist()
        # decode inputs are the generated tokens before the row's first eos (none after it)
        live = gen.index(eos) if eos in gen else 5
        decode = int(((t["request"] == row) & (t["phase"] == PHASE_DECODE)).sum())
        assert decode == live, row
    assert eos in out[0, 7:].tolist()


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_outputs_bit_identical_and_hooks_gone_even_after_an_exception(tmp_path):
    model, _ = build("deepseek-v3")
    ids, mask = _padded_batch()
    before = _all_hooks(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with record(model):
            got = model(input_ids=ids, attention_mask=mask).logits
            assert _all_hooks(model) > before
    assert torch.equal(ref, got)
    assert _all_hooks(model) == before
    out = tmp_path / "trace.parquet"
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), record(model, out=out):
        model(input_ids=ids, attention_mask=mask)
        raise KeyboardInterrupt
    assert _all_hooks(model) == before
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_streaming_to_parquet_matches_memory(tmp_path):
    model, _ = build("olmoe")
    ids, mask = _padded_batch(3)
    out = tmp_path / "shards"
    with torch.no_grad():
        with record(model, weights=True) as mem:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        with record(model, weights=True, out=out) as disk:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    a, b = mem.trace(), read_trace(out)
    assert out.is_dir() and any(out.glob("part-*.parquet"))
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    for k in ("request", "position", "phase", "step"):
        np.testing.assert_array_equal(a.tokens[k], b.tokens[k])
    assert disk.num_tokens == len(b) and b.meta.extra["routers"][0] == "model.layers.0.mlp.gate"


class _CustomMoE(torch.nn.Module):
    """A hand-written MoE: its router returns (scores, indices), nothing transformers-like."""

    def __init__(self, layers=2, n=6, k=2, h=8):
        super().__init__()
        self.emb = torch.nn.Embedding(20, h)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            blk = torch.nn.Module()
            blk.route = _Route(h, n, k)
            self.blocks.append(blk)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for blk in self.blocks:
            scores, _ = blk.route(x.reshape(-1, x.shape[-1]))
            x = x + scores.sum(-1, keepdim=True).reshape(*x.shape[:2], 1)
        return x


class _Route(torch.nn.Module):
    def __init__(self, h, n, k):
        super().__init__()
        self.proj = torch.nn.Linear(h, n)
        self.k = k

    def forward(self, x):
        return torch.topk(self.proj(x), self.k, dim=-1)


def test_generic_adapter_for_custom_models_and_unknown_models_fail_clearly():
    torch.manual_seed(0)
    model = _CustomMoE()
    ids = torch.randint(0, 20, (2, 5))
    spy = []
    hs = [b.route.register_forward_hook(lambda m, a, o: spy.append(o[1])) for b in model.blocks]
    with torch.no_grad(), record(model, routers="blocks.*.route", extract=lambda out: out[1],
                                 num_experts=6, top_k=2) as rec:
        model(ids)
    for h in hs:
        h.remove()
    tr = rec.trace()
    np.testing.assert_array_equal(tr.experts, torch.stack(spy, 1).numpy())
    assert tr.tokens["request"].tolist() == [0] * 5 + [1] * 5
    with pytest.raises(InputError, match="no MoE router recognised"):
        record(torch.nn.Sequential(torch.nn.Linear(4, 4))).__enter__()
    with pytest.raises(InputError, match="no module name matches"):
        record(model, routers="nothing.*", extract=lambda o: o[1], num_experts=6,
               top_k=2).__enter__()
    assert _all_hooks(model) == 0


@pytest.mark.gpu
def test_gpu_recording_matches_cpu_and_memory_stays_bounded():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, _ = build("qwen3-moe")
    ids, mask = _padded_batch()
    with torch.no_grad(), record(model) as cpu_rec:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model = model.cuda()
    with torch.no_grad(), record(model) as gpu_rec:
        model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8,
                       do_sample=False)
        peak = torch.cuda.memory_allocated()
        model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=64,
                       do_sample=False)
        assert torch.cuda.memory_allocated() <= peak + (1 << 20)
    a, b = cpu_rec.trace(), gpu_rec.trace()
    np.testing.assert_array_equal(np.sort(a.experts, 2), np.sort(b.experts[: len(a)], 2))


def test_inference_mode_no_grad_and_grad_forwards_mix():
    model, _ = build("qwen3-moe")
    ids, mask = _padded_batch(4)
    with record(model, weights=True) as rec:
        with torch.inference_mode():  # first forward allocates the buffers
            model(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()  # gate weights need grad
    tr = rec.trace()
    n = int(mask.sum())
    assert len(tr) == 3 * n
    np.testing.assert_array_equal(tr.experts[:n], tr.experts[n:2 * n])
    np.testing.assert_array_equal(tr.experts[:n], tr.experts[2 * n:])


_QWEN = {}


def _qwen():
    if not _QWEN:
        _QWEN["m"] = build("qwen3-moe", seed=7)
    return _QWEN["m"]


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_any_left_padding_records_exactly_the_real_tokens(lengths, seed):
    model, names = _qwen()
    T = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    spy = _RouterInputs(model, names)
    with torch.no_grad(), record(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    spy.remove()
    tr = rec.trace()
    valid = mask.reshape(-1).bool().numpy()
    np.testing.assert_array_equal(np.sort(tr.experts, axis=2),
                                  _expected("qwen3-moe", model.config, spy.calls, [valid]))
    np.testing.assert_array_equal(tr.tokens["request"], np.repeat(np.arange(len(lengths)), lengths))
    np.testing.assert_array_equal(tr.tokens["position"], np.concatenate([np.arange(n) for n in lengths]))
