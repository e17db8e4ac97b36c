"""The weighted sum over tasks that loss weighting (torch, at training) and score fusion (numpy, at
serving) both reduce with: one definition for both array kinds, importing neither."""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # a numpy array or a torch tensor: both broadcast, multiply and sum alike


def weighted_sum(values: Array, weights: Array) -> Array:
    """``(...,)``: ``sum_t w_t x_t`` of ``values`` ``(..., T)`` and ``weights`` ``(T,)``, over the last axis."""
    return (values * weights).sum(-1)
