"""`moeplace apply`: rewritten checkpoints of tiny random models keep their logits, shard
contiguously into the planned experts, and invert to the original bytes; bad input is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from moeplace.cli import main
from moeplace.placement import Placement, contiguous, random_placement
from moeplace.placement.checkpoint import SIDECAR, rewrite_checkpoint
from tests.tiny_models import N_EXPERTS, build

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

G = 4
ARCHS = ("mixtral", "qwen3-moe", "olmoe", "deepseek-v3", "gpt-oss")


def _moe_layers(arch):
    return (1, 2) if arch == "deepseek-v3" else (0, 1, 2)


def _placement(arch, seed):
    layers = _moe_layers(arch)
    if arch != "deepseek-v3":
        return random_placement(len(layers), N_EXPERTS, G, seed=seed, moe_layer_ids=layers)
    # n_group = 4 groups of 2 experts: move whole groups (and shuffle inside each) only.
    rng = np.random.default_rng(seed)
    rows = []
    for _ in layers:
        groups = rng.permutation(4)
        rows.append(np.concatenate([rng.permutation([2 * g, 2 * g + 1]) for g in groups]))
    return Placement(np.array(rows), G, 1, N_EXPERTS, moe_layer_ids=layers)


def _save(model, d, layout):
    """``hub``: save_pretrained (per-expert names where transformers writes them);
    ``fused``: the in-memory 5.x names (experts.gate_up_proj ...); ``sharded``: several files."""
    if layout == "sharded":
        model.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").is_file()
        return
    model.save_pretrained(d)
    if layout == "fused":
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        safetensors_torch.save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


def _router_rows(model, layer):
    mlp = model.model.layers[layer].mlp
    return (mlp.router if hasattr(mlp, "router") else mlp.gate).weight.detach()


CASES = [(a, "hub") for a in ARCHS] + [(a, "fused") for a in ARCHS if a != "gpt-oss"] + [
    ("qwen3-moe", "sharded")]


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{l}" for a, l in CASES])
def test_rewritten_checkpoint_keeps_logits_realises_plan_and_inverts(arch, layout, tmp_path):
    model, _ = build(arch, seed=1)
    src, dst, back = tmp_path / "src", tmp_path / "dst", tmp_path / "back"
    _save(model, src, layout)
    plc = _placement(arch, seed=5)
    res = CliRunner().invoke(main, ["apply", str(_save_plc(plc, tmp_path)), "--checkpoint",
                                    str(src), "--out", str(dst)])
    assert res.exit_code == 0, res.output
    cls = type(model)
    new = cls.from_pretrained(dst).eval()
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    # Contiguous split over G ranks: rank g's router rows are the planned experts of GPU g.
    S = N_EXPERTS // G
    for j, h in enumerate(plc.moe_layer_ids):
        old, rew = _router_rows(model, h), _router_rows(new, h)
        for g, experts in enumerate(plc.gpu_experts(j)):
            assert torch.equal(rew[g * S:(g + 1) * S], old[experts]), (h, g)
    assert json.loads((dst / SIDECAR).read_text())["num_gpus"] == G
    res = CliRunner().invoke(main, ["apply", "--invert", "--checkpoint", str(dst), "--out",
                                    str(back)])
    assert res.exit_code == 0, res.output
    a, b = _tensors(src), _tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in src.glob("*.safetensors"):
        assert (back / f.name).read_bytes() == f.read_bytes(), f.name  # byte-identical files
    assert not (back / SIDECAR).exists()


def _save_plc(plc, tmp_path, name="plc.json"):
    path = tmp_path / name
    plc.save(path)
    return path


def test_apply_on_an_applied_checkpoint_starts_from_the_original_order(tmp_path):
    model, _ = build("qwen3-moe", seed=2)
    model.save_pretrained(tmp_path / "src")
    p1, p2 = _placement("qwen3-moe", 1), _placement("qwen3-moe", 2)
    rewrite_checkpoint(tmp_path / "src", tmp_path / "a", p1)
    rewrite_checkpoint(tmp_path / "a", tmp_path / "b", p2)
    rewrite_checkpoint(tmp_path / "src", tmp_path / "c", p2)
    b, c = _tensors(tmp_path / "b"), _tensors(tmp_path / "c")
    assert all(torch.equal(b[k], c[k]) for k in c)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    build("deepseek-v3", seed=3)[0].save_pretrained(d / "ckpt")
    return d / "ckpt"


def _one_line_exit_2(args, needle, out):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary left behind


def test_bad_inputs_are_one_line_errors_with_nothing_written(deepseek_dir, tmp_path):
    out = tmp_path / "out"
    ok = _placement("deepseek-v3", 0)
    cases = [
        (contiguous(3, 8, G, moe_layer_ids=(0, 1, 2)), "checkpoint has 2 MoE layers"),
        (contiguous(2, 16, G, moe_layer_ids=(1, 2)), "x 8 experts"),
        (contiguous(2, 8, G, replicas=4, moe_layer_ids=(1, 2)), "export"),
        (random_placement(2, 8, G, seed=11, moe_layer_ids=(1, 2)), "--respect-groups"),
    ]
    for i, (plc, needle) in enumerate(cases):
        _one_line_exit_2(["apply", str(_save_plc(plc, tmp_path, f"p{i}.json")), "--checkpoint",
                          str(deepseek_dir), "--out", str(out)], needle, out)
    # an output directory that exists and is not empty
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["apply", str(_save_plc(ok, tmp_path)), "--checkpoint",
                                    str(deepseek_dir), "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    shutil.rmtree(out)
    # a checkpoint missing one expert tensor
    broken = tmp_path / "broken"
    shutil.copytree(deepseek_dir, broken)
    sd = safetensors_torch.load_file(broken / "model.safetensors")
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    safetensors_torch.save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    _one_line_exit_2(["apply", str(_save_plc(ok, tmp_path)), "--checkpoint", str(broken),
                      "--out", str(out)], "experts.5.up_proj", out)
    # --invert on a checkpoint that was never rewritten
    _one_line_exit_2(["apply", "--invert", "--checkpoint", str(deepseek_dir), "--out", str(out)],
                     SIDECAR, out)


def test_a_placement_may_leave_moe_layers_out(tmp_path):
    model, _ = build("qwen3-moe", seed=3)
    model.save_pretrained(tmp_path / "src")
    full = _placement("qwen3-moe", 4)
    part = Placement(full.phy2log[1:], G, 1, N_EXPERTS, moe_layer_ids=(1, 2))
    rewrite_checkpoint(tmp_path / "src", tmp_path / "a", full)
    rewrite_checkpoint(tmp_path / "a", tmp_path / "b", part)  # layer 0 goes back to original
    rewrite_checkpoint(tmp_path / "src", tmp_path / "c", part)
    src, b, c = (_tensors(tmp_path / n) for n in ("src", "b", "c"))
    for k in src:
        assert torch.equal(b[k], c[k]), k
        if "layers.0." in k:
            assert torch.equal(c[k], src[k]), k
    assert not all(torch.equal(c[k], src[k]) for k in src if "layers.1.mlp.gate" in k)
