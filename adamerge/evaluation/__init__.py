"""Evaluators (classification accuracy, causal-LM held-out loss) returning {task: {metric: value}}, and results tables."""
