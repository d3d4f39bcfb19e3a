"""Checkpoint surgery: per-rank resharding and its exact inverse, and MoE routing counts."""
