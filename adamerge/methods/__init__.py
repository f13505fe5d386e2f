"""Merging methods, each registered under its config name (registry.py); static kernels are pure functions over [K, ...] stacks.

Importing this package registers every method: static merges first (cheap), then the learned ones.
"""

# Registration order is listing order: static merges (cheap first), data-driven closed forms, then the learners.
from adamerge.methods import static, masks, lines, subspace, wudi, doge, regmean, fisher  # noqa: F401, I001
from adamerge.methods import adamerging, expert_merging  # noqa: F401, I001
from adamerge.methods.registry import REGISTRY, MergeResult, Needs, Run, build_method, methods, register

__all__ = ["REGISTRY", "MergeResult", "Needs", "Run", "build_method", "methods", "register"]
