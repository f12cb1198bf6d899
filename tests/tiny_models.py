"""Tiny random transformers MoE models of every architecture moeplace supports, and an
independent top-k for each router written from the architectures' published routing rules."""

from __future__ import annotations

import numpy as np

ARCHS = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v3", "gpt-oss")
N_EXPERTS, TOP_K, VOCAB = 8, 2, 96


def build(arch: str, seed: int = 0, num_layers: int = 3):
    """(model in eval mode, names of the MoE layers' router modules in layer order)."""
    import torch
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_experts_per_tok=TOP_K, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None)
    if arch == "mixtral":
        cfg, cls = tf.MixtralConfig(intermediate_size=16, num_local_experts=N_EXPERTS, **common), \
            tf.MixtralForCausalLM
    elif arch == "qwen2-moe":
        cfg, cls = tf.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16,
                                     shared_expert_intermediate_size=16, num_experts=N_EXPERTS,
                                     decoder_sparse_step=1, mlp_only_layers=[],
                                     **{k: v for k, v in common.items() if k != "head_dim"}), \
            tf.Qwen2MoeForCausalLM
    elif arch == "qwen3-moe":
        cfg, cls = tf.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=16,
                                     num_experts=N_EXPERTS, decoder_sparse_step=1,
                                     mlp_only_layers=[], **common), tf.Qwen3MoeForCausalLM
    elif arch == "olmoe":
        cfg, cls = tf.OlmoeConfig(intermediate_size=16, num_experts=N_EXPERTS,
                                  **{k: v for k, v in common.items() if k != "head_dim"}), \
            tf.OlmoeForCausalLM
    elif arch == "deepseek-v3":
        # MLA attention: no grouped key/value heads.
        kw = {k: v for k, v in common.items() if k != "head_dim"} | {"num_key_value_heads": 4}
        cfg, cls = tf.DeepseekV3Config(intermediate_size=32, moe_intermediate_size=16,
                                       n_routed_experts=N_EXPERTS, n_shared_experts=1, n_group=4,
                                       topk_group=2, first_k_dense_replace=1, q_lora_rank=16,
                                       kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                       v_head_dim=8, norm_topk_prob=True, rope_scaling=None,
                                       **kw), tf.DeepseekV3ForCausalLM
    elif arch == "gpt-oss":
        cfg, cls = tf.GptOssConfig(intermediate_size=16, num_local_experts=N_EXPERTS,
                                   sliding_window=8, **common), tf.GptOssForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random router rows and biases (some inits are zeros), so routing is not tied.
            if name.endswith(("gate.weight", "router.weight", "router.bias")) and "proj" not in name:
                p.normal_(0.0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.2, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    routers = [n for n, _ in model.named_modules() if n.endswith((".mlp.gate", ".mlp.router",
                                                                  ".block_sparse_moe.gate"))]
    return model, routers


def reference_topk(arch: str, router, hidden, config) -> np.ndarray:
    """``[tokens, k]`` sorted expert ids that ``router`` picks for ``hidden`` (float64 numpy)."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1]).numpy()
    w = router.weight.detach().double().numpy()
    logits = h @ w.T
    if arch == "gpt-oss":
        logits = logits + router.bias.detach().double().numpy()
        top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    elif arch == "deepseek-v3":
        scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + router.e_score_correction_bias.detach().double().numpy()
        G = config.n_group
        per = N_EXPERTS // G
        grouped = choice.reshape(-1, G, per)
        group_score = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)
        keep = np.argsort(-group_score, axis=1, kind="stable")[:, :config.topk_group]
        allowed = np.zeros_like(group_score, bool)
        np.put_along_axis(allowed, keep, True, axis=1)
        masked = np.where(np.repeat(allowed, per, axis=1), choice, -np.inf)
        top = np.argsort(-masked, axis=1, kind="stable")[:, :TOP_K]
    else:  # softmax top-k equals logit top-k
        top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    return np.sort(top, axis=1)
