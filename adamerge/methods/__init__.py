"""Merging methods, each registered under its config name (registry.py); static kernels are pure functions over [K, ...] stacks.

Importing this package registers every method: static merges first (cheap), then the learned ones.
"""

from adamerge.methods import static, doge, adamerging, expert_merging  # noqa: F401, I001 - registration, in this order
from adamerge.methods.registry import REGISTRY, MergeResult, Needs, Run, build_method, methods, register

__all__ = ["REGISTRY", "MergeResult", "Needs", "Run", "build_method", "methods", "register"]
