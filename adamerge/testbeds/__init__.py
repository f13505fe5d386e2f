"""Benchmark testbeds built offline: tiny BERT and Llama experts, MiniLM experts on the shipped text tasks."""
