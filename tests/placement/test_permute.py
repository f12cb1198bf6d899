"""Permuting a real (tiny, random) transformers model keeps its logits and realises the plan."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.errors import InputError
from moeplace.placement import contiguous, random_placement
from moeplace.placement.permute import permute_state_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _models():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2)
    yield Qwen3MoeForCausalLM, Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                              num_experts=8, decoder_sparse_step=1,
                                              mlp_only_layers=[], **common)
    yield MixtralForCausalLM, MixtralConfig(intermediate_size=16, num_local_experts=8, **common)


@pytest.mark.parametrize("cls,cfg", list(_models()), ids=["qwen3-moe", "mixtral"])
def test_permuted_model_has_identical_logits_and_planned_shards(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    plc = random_placement(3, 8, 4, seed=3, moe_layer_ids=(0, 1, 2))
    sd = model.state_dict()
    new_sd = permute_state_dict(sd, plc)
    other = cls(cfg).eval()
    other.load_state_dict(new_sd, strict=True)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        a = model(ids).logits
        b = other(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Contiguous split of the rewritten router rows: GPU g holds exactly its planned experts.
    for l in range(3):
        old = sd[f"model.layers.{l}.mlp.gate.weight"]
        new = new_sd[f"model.layers.{l}.mlp.gate.weight"]
        for g, experts in enumerate(plc.gpu_experts(l)):
            torch.testing.assert_close(new[2 * g:2 * g + 2], old[experts], atol=0, rtol=0)
    back = permute_state_dict(new_sd, plc, invert=True)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_per_expert_names_follow_the_same_permutation():
    plc = random_placement(1, 4, 2, seed=1, moe_layer_ids=(5,))
    sd = {f"model.layers.5.block_sparse_moe.experts.{e}.w1.weight": np.full((2, 2), e)
          for e in range(4)}
    sd["model.layers.5.block_sparse_moe.gate.weight"] = np.arange(4)[:, None] * np.ones((4, 3))
    out = permute_state_dict(sd, plc)
    for i, old in enumerate(plc.phy2log[0]):
        assert (out[f"model.layers.5.block_sparse_moe.experts.{i}.w1.weight"] == old).all()
        assert (out["model.layers.5.block_sparse_moe.gate.weight"][i] == old).all()


def test_replicas_and_wrong_layers_are_refused():
    sd = {"model.layers.0.mlp.gate.weight": np.zeros((6, 2))}
    with pytest.raises(InputError, match="export"):
        permute_state_dict(sd, contiguous(1, 6, 4, replicas=2, moe_layer_ids=(0,)))
    with pytest.raises(InputError, match="layers.3"):
        permute_state_dict(sd, contiguous(1, 8, 4, moe_layer_ids=(3,)))
