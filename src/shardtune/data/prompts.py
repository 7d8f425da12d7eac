"""Prompt records for online RL (task grpo): read whole, templated, tokenized once, and a rollout's rows.

A record holds the prompt (`grpo.prompt_field`: text, or chat turns) and whatever the rewards read (e.g. the
reference answer). A text prompt becomes a user turn of the tokenizer's chat template when it has one
(`grpo.chat_template`), with the assistant's turn opened (add_generation_prompt); chat turns go through the
template as they are. A prompt longer than `max_prompt_length` keeps its tail (where the question is).

`rollout_rows` lays a rollout out for the training forward: each row its prompt left-padded to the batch's
longest, then its completion right-padded, with the attention mask, the position ids the model saw while
generating (counted over real tokens only, so padding changes nothing), and the completion mask: the tokens up
to and including the first EOS (or up to the padding after a stop string).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardtune import ShardtuneError


@dataclass
class Prompt:
    ids: list[int]
    text: str  # as shown in tables
    record: dict  # the whole record: what the rewards read


def encode_prompts(records: list, tokenizer, cfg) -> list[Prompt]:
    """(where, record) pairs (data/records.py) -> Prompts; one sentence for a record without its prompt."""
    out = []
    templated = cfg.chat_template and getattr(tokenizer, "chat_template", None)
    for where, record in records:
        value = record.get(cfg.prompt_field)
        if isinstance(value, str) and templated:
            value = [{"role": "user", "content": value}]
        if isinstance(value, list) and templated:
            ids = tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            text = value[-1].get("content", "") if value and isinstance(value[-1], dict) else str(value)
        elif isinstance(value, str):
            ids, text = tokenizer(value, add_special_tokens=True)["input_ids"], value
        else:
            have = ", ".join(map(str, record)) or "none"
            raise ShardtuneError(f"{where} has no text prompt in field {cfg.prompt_field!r} (it has: {have}); set data.grpo.prompt_field.")
        if not ids:
            raise ShardtuneError(f"{where} has an empty prompt; fix or remove that record.")
        out.append(Prompt(list(ids)[-cfg.max_prompt_length:], text, record))
    return out


def completion_mask(completions: torch.Tensor, eos: int, pad: int | None = None) -> torch.Tensor:
    """1 for each completion token up to and including the first EOS, 0 after it; and 0 from the first `pad` on
    (generate pads a row a stop string ended; a pad that is the EOS counts as the EOS)."""
    is_eos = completions == eos
    keep = (is_eos.cumsum(-1) - is_eos.long()) == 0  # not after the first EOS
    if pad is not None and pad != eos:
        keep &= (completions == pad).cumsum(-1) == 0
    return keep.long()


def rollout_rows(prompts: list[list[int]], completions: list[torch.Tensor], eos: int, pad: int) -> dict:
    """Rows of prompt + completion: input_ids, attention_mask, position_ids, completion_ids, completion_mask."""
    p_len, c_len = max(map(len, prompts)), max(c.shape[-1] for c in completions)
    rows, attn, comp_ids, comp_mask = [], [], [], []
    for prompt, completion in zip(prompts, completions):
        c = torch.full((c_len,), pad, dtype=torch.long)
        c[: completion.shape[-1]] = completion
        m = completion_mask(c, eos, pad)
        m[completion.shape[-1]:] = 0
        left = p_len - len(prompt)
        rows.append(torch.cat([torch.full((left,), pad, dtype=torch.long), torch.tensor(prompt, dtype=torch.long), c]))
        attn.append(torch.cat([torch.zeros(left, dtype=torch.long), torch.ones(len(prompt), dtype=torch.long), m]))
        comp_ids.append(c)
        comp_mask.append(m)
    mask = torch.stack(attn)
    return {"input_ids": torch.stack(rows), "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "completion_ids": torch.stack(comp_ids), "completion_mask": torch.stack(comp_mask)}
