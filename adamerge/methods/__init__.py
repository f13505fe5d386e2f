"""Merging methods, each registered under its config name (registry.py); static kernels are pure functions over [K, ...] stacks."""
