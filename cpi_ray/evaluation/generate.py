"""Batched greedy generation for evaluation, on CPU or GPU.

Prompts are tokenized exactly as in training (`cpi_ray.data.formatting.prompt_ids`), grouped by
length to pad little, left-padded (so every row's next token sits in the last column), decoded
from the new tokens only, up to the first end-of-sequence token.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers import GenerationConfig

from cpi_ray.data.formatting import prompt_ids


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (chat models often end a
    turn with a token other than the tokenizer's EOS)."""
    ids: list[int] = []
    for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token")
    return ids


@torch.inference_mode()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    device: Optional[torch.device | str] = None,
) -> list[str]:
    """Greedy continuations of `prompts` (already formatted), stripped, in input order."""
    if not prompts:
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id
    )
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    # Longest first: a batch that does not fit in memory fails at once, not at the end.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[Optional[str]] = [None] * len(encoded)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=gen_cfg,
        )
        for r, i in enumerate(idx):
            new = generated[r, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return [s if s is not None else "" for s in out]
