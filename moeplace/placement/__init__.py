"""Placement: the expert-to-GPU layout type, its constructors, and its appliers."""

from moeplace.placement.placement import (
    Placement,
    contiguous,
    from_gpu_lists,
    random_placement,
    round_robin,
)

__all__ = ["Placement", "contiguous", "from_gpu_lists", "random_placement", "round_robin"]
