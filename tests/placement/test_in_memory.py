"""apply_to_model: experts split over several (CPU stand-in) devices give the original outputs,
with each part holding exactly its GPU's planned experts."""

from __future__ import annotations

import pytest

from moeplace.errors import InputError
from moeplace.placement import apply_to_model, contiguous, random_placement
from tests.tiny_models import ARCHS, N_EXPERTS, VOCAB, build

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _layers(arch):
    return (1, 2) if arch == "deepseek-v3" else (0, 1, 2)


def _check(arch, plc, devices):
    model, _ = build(arch, seed=6)
    ref, _ = build(arch, seed=6)
    originals = {h: ref.model.layers[h].mlp.experts for h in _layers(arch)}
    dmap = apply_to_model(model, plc, devices)
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # The inputs go where the model's embeddings now live (devices[0] unless main_device).
        torch.testing.assert_close(model(ids.to(dmap[""])).logits.cpu(), ref(ids).logits, atol=1e-5,
                                   rtol=0)
        a = model.generate(input_ids=ids.to(dmap[""]), max_new_tokens=4, do_sample=False)
        b = ref.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(a.cpu(), b)
    for j, h in enumerate(_layers(arch)):
        placed = model.model.layers[h].mlp.experts
        for g, experts in enumerate(plc.gpu_experts(j)):
            part = placed.parts[g]
            assert dmap[f"model.layers.{h}.mlp.experts.parts.{g}"] == torch.device(devices[g])
            for name, p in originals[h].named_parameters():
                if p.shape[0] == N_EXPERTS:
                    got = getattr(part, name)
                    assert got.device == torch.device(devices[g])
                    assert torch.equal(got.cpu(), p.detach()[experts]), (h, g, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_equal_the_original_on_cpu_devices(arch):
    plc = random_placement(len(_layers(arch)), N_EXPERTS, 4, seed=4, moe_layer_ids=_layers(arch))
    _check(arch, plc, ["cpu"] * 4)


def test_replicas_share_tokens_and_keep_outputs():
    plc = random_placement(3, N_EXPERTS, 4, replicas=4, seed=9, moe_layer_ids=(0, 1, 2))
    assert plc.num_replicas == 4
    _check("qwen3-moe", plc, ["cpu"] * 4)


def test_wrong_placement_is_refused():
    model, _ = build("mixtral")
    with pytest.raises(InputError, match="devices"):
        apply_to_model(model, contiguous(3, 8, 4, moe_layer_ids=(0, 1, 2)), ["cpu"] * 2)
    with pytest.raises(InputError, match="experts modules"):
        apply_to_model(model, contiguous(2, 8, 4, moe_layer_ids=(0, 1)), ["cpu"] * 4)
    with pytest.raises(InputError, match="16 experts"):
        apply_to_model(model, contiguous(3, 16, 4, moe_layer_ids=(0, 1, 2)), ["cpu"] * 4)


@pytest.mark.gpu
def test_gpu_cpu_mix():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    plc = random_placement(3, N_EXPERTS, 4, seed=4, moe_layer_ids=(0, 1, 2))
    _check("qwen3-moe", plc, ["cuda:0", "cpu", "cuda:0", "cpu"])


def test_a_dispatched_model_keeps_its_layout():
    model, _ = build("olmoe", seed=6)
    ref, _ = build("olmoe", seed=6)
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "lm_head": "cpu"}
    plc = random_placement(3, N_EXPERTS, 2, seed=1, moe_layer_ids=(0, 1, 2))
    dmap = apply_to_model(model, plc, ["cpu", "cpu"])
    assert dmap["lm_head"] == "cpu" and "" not in dmap
    assert dmap["model.layers.0.mlp.experts.parts.1"] == torch.device("cpu")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
