"""The whole loop on a tiny DeepSeek-V3 (group-limited routing): record its routing, solve a
group-respecting placement, rewrite the checkpoint, and get the same logits back."""

from __future__ import annotations

import pytest

from moeplace.placement import contiguous
from moeplace.placement.checkpoint import rewrite_checkpoint
from moeplace.solvers import score, solve_with_report
from moeplace.traces import compute_stats
from tests.tiny_models import VOCAB, build

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moeplace.profiling import record  # noqa: E402


def test_profile_solve_apply_keeps_the_model(tmp_path):
    model, _ = build("deepseek-v3", seed=4)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record(model) as rec:
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    stats = compute_stats(rec.trace())
    assert stats.meta.moe_layer_ids == (1, 2)
    plc, rep = solve_with_report(stats, 4, respect_groups=model.config.n_group, engine="exflow")
    assert plc.moe_layer_ids == (1, 2)  # carried from the trace, as apply needs
    rewrite_checkpoint(tmp_path / "ckpt", tmp_path / "placed", plc)
    placed = type(model).from_pretrained(tmp_path / "placed").eval()
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    # contiguous keeps groups whole too, so the optimum over such placements is no worse
    base = score(stats, contiguous(2, 8, 4))
    assert rep.status == "optimal" and rep.objective["total"] <= base.total + 1e-12
