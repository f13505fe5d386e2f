"""Calibration sets completed by the experts themselves: each prompt gets its expert's greedy response.

Expert Merging on causal LMs aligns the merge with each expert on that expert's own responses (``response_mask``
marks them), so a calibration set of prompts is enough.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


@torch.no_grad()
def with_expert_responses(merged, datasets: Mapping, max_new_tokens: int = 32, pad_id: int = 0, **generate_kwargs):
    """Complete each task's prompts with its expert's greedy response: rows gain ``response_mask``.

    The expert (the merged model at the one-hot table) is materialised one at a time with ``merge_and_unload`` for
    ``generate``. Prompts are generated one by one (no left-padding subtleties); calibration sets are small.
    """
    import datasets as hf_datasets

    out = {}
    for task, dataset in datasets.items():
        one_hot = torch.zeros_like(merged.coefficients())
        one_hot[merged.experts.index(task)] = 1.0
        expert = merged.merge_and_unload(params=merged.merged_tensors(one_hot)).eval()
        rows = {"input_ids": [], "attention_mask": [], "response_mask": []}
        for i in range(len(dataset)):
            prompt = torch.as_tensor(dataset[i]["input_ids"])[None].to(merged.coefficients.raw.device)
            full = expert.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                **generate_kwargs,
            )[0].cpu()
            rows["input_ids"].append(full.tolist())
            rows["attention_mask"].append([1] * len(full))
            rows["response_mask"].append([0] * prompt.shape[1] + [1] * (len(full) - prompt.shape[1]))
        del expert
        out[task] = hf_datasets.Dataset.from_dict(rows)
    return out
