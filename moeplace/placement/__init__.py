"""Placement: the expert-to-GPU layout type, its constructors, and its appliers."""

from moeplace.placement.checkpoint import rewrite_checkpoint
from moeplace.placement.exports import (
    FORMATS,
    export_disaggregated,
    export_placement,
    launch_flags,
    read_placement,
    to_eplb,
    to_sglang,
    to_sglang_logical_count,
    to_vllm_ascend,
)
from moeplace.placement.in_memory import apply_to_model
from moeplace.placement.permute import layer_permutations, permute_state_dict
from moeplace.placement.placement import (
    Placement,
    contiguous,
    from_gpu_lists,
    random_placement,
    round_robin,
)

__all__ = [
    "FORMATS",
    "Placement",
    "apply_to_model",
    "contiguous",
    "export_disaggregated",
    "export_placement",
    "from_gpu_lists",
    "launch_flags",
    "layer_permutations",
    "permute_state_dict",
    "random_placement",
    "read_placement",
    "rewrite_checkpoint",
    "round_robin",
    "to_eplb",
    "to_sglang",
    "to_sglang_logical_count",
    "to_vllm_ascend",
]
