"""DPO shaping: preference records -> tokenized (chosen, rejected) pairs, loss on the responses only.

Preference data sets are small: the records are read whole (data/records.py)
and every pair is tokenized once up front (encode_records), like
classification's examples, so the DPO task batches them with
data/batching.py. Records (field names from `DpoConfig`; decided per record
by the values' types, as TRL's preference formats are):

    text            {"prompt": str, "chosen": str, "rejected": str}
    chat, explicit  {"prompt": [turns], "chosen": [assistant turn(s)], "rejected": [...]}
    chat, implicit  {"chosen": [whole conversation], "rejected": [whole conversation]}
                    (the prompt is the turns both share from the start, as trl.extract_prompt finds it)

A text prompt is one user turn; a text response is one assistant turn.
Each side is the prompt's turns followed by its response's turns, rendered
and tokenized by sft.encode (the tokenizer's chat template, or the plain
fallback with an EOS after each response), so a pair's two sides share the
prompt's tokens exactly. Labels are the ids of the response's assistant
turns (with their end-of-turn text / EOS) and IGNORE everywhere else,
including assistant turns inside the prompt.

Drops (raised as sft.Drop, counted as `data/dropped/<reason>`): bad_message
(not an object, a missing field, a turn without a known role or text),
no_assistant (a response without an assistant turn), empty_response,
same_responses (chosen == rejected: no preference to learn), template_mismatch
(see sft.py), too_long (a side longer than max_length with too_long: drop,
or with truncate when not one response token is left on a side). too_long:
truncate cuts each side's tail to max_length and counts
`data/repaired/truncated` once per pair. Every turn's text goes through the
clean stage's repairs (clean.normalize), as in SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from shardtune.config import CleanConfig, DpoConfig, SftConfig
from shardtune.data.clean import Counts, normalize
from shardtune.data.pack import IGNORE
from shardtune.data.sft import Drop, encode, parse_messages

CHAT = SftConfig(format="chat")  # how a side's turns are checked (sft.parse_messages)
SIDES = ("chosen", "rejected")


@dataclass
class Pair:
    """One tokenized preference pair; labels are IGNORE off the response tokens."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def _turns(value: Any, role: str) -> list:
    """A text becomes one turn of `role`; a list of turns is kept (checked later); anything else is a bad record."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise Drop("bad_message")


def shared_prefix(chosen: list, rejected: list) -> int:
    """How many turns the two conversations share from the start (trl.data_utils.extract_prompt's rule)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def split_record(record: Any, cfg: DpoConfig) -> tuple[list, list, list]:
    """(prompt turns, chosen turns, rejected turns) of one record, unchecked; raises Drop(reason)."""
    if not isinstance(record, dict) or cfg.chosen_field not in record or cfg.rejected_field not in record:
        raise Drop("bad_message")
    chosen = _turns(record[cfg.chosen_field], "assistant")
    rejected = _turns(record[cfg.rejected_field], "assistant")
    if cfg.prompt_field in record:
        return _turns(record[cfg.prompt_field], "user"), chosen, rejected
    if not isinstance(record[cfg.chosen_field], list) or not isinstance(record[cfg.rejected_field], list):
        raise Drop("bad_message")  # text responses need a prompt field
    n = shared_prefix(chosen, rejected)
    return chosen[:n], chosen[n:], rejected[n:]


def pair_messages(record: Any, cfg: DpoConfig) -> tuple[int, list[dict], list[dict]]:
    """(prompt length in turns, chosen side's turns, rejected side's turns), each side = prompt + response."""
    prompt, chosen, rejected = split_record(record, cfg)
    if chosen == rejected:
        raise Drop("same_responses")
    sides = []
    for response in (chosen, rejected):
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in response):
            raise Drop("no_assistant" if all(isinstance(m, dict) for m in response) else "bad_message")
        sides.append(parse_messages({CHAT.messages_field: prompt + response}, CHAT))
    return len(prompt), sides[0], sides[1]


def _fit(ids: list[int], labels: list[int], cfg: DpoConfig) -> tuple[list[int], list[int], bool]:
    """(ids, labels, cut) within cfg.max_length; raises Drop('too_long')."""
    if len(ids) <= cfg.max_length:
        return ids, labels, False
    if cfg.too_long == "drop" or all(x == IGNORE for x in labels[: cfg.max_length]):
        raise Drop("too_long")
    return ids[: cfg.max_length], labels[: cfg.max_length], True


def encode_pair(record: Any, tokenizer, cfg: DpoConfig, eos_id: int, clean: Optional[CleanConfig] = None,
                counts: Optional[Counts] = None) -> Pair:
    """One parsed record -> Pair within cfg.max_length; raises Drop(reason). Repairs go to counts."""
    counts = {} if counts is None else counts
    n_prompt, *sides = pair_messages(record, cfg)
    out, cut = [], False
    for messages in sides:
        if clean is not None:
            for m in messages:
                m["content"] = normalize(m["content"], clean, counts)
            if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
                raise Drop("empty_response")
        ids, labels = encode(messages, tokenizer, eos_id, train_from=n_prompt)
        ids, labels, side_cut = _fit(ids, labels, cfg)
        out += [ids, labels]
        cut = cut or side_cut
    if cut:
        counts["data/repaired/truncated"] = counts.get("data/repaired/truncated", 0) + 1
    return Pair(*out)


def encode_records(records: Sequence[tuple[Any, dict]], tokenizer, cfg: DpoConfig, clean: CleanConfig, eos_id: int) -> tuple[list[Pair], Counts]:
    """Records read whole (data/records.py) -> the pairs that can be used, and counts: `data/dropped/<reason>` for the
    others, `data/documents`, `data/response_tokens` and repairs for the kept ones."""
    pairs: list[Pair] = []
    counts: Counts = {}
    for _, record in records:
        repairs: Counts = {}
        try:
            pair = encode_pair(record, tokenizer, cfg, eos_id, clean, repairs)
        except Drop as exc:
            key = f"data/dropped/{exc.args[0]}"
            counts[key] = counts.get(key, 0) + 1
            continue
        pairs.append(pair)
        repairs["data/documents"] = 1
        repairs["data/response_tokens"] = sum(x != IGNORE for x in pair.chosen_labels + pair.rejected_labels)
        for key, n in repairs.items():
            counts[key] = counts.get(key, 0) + n
    return pairs, counts


def pad_length(pairs: Sequence[Pair], multiple: int = 8) -> int:
    longest = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return -(-longest // multiple) * multiple


def collate_pairs(pairs: Sequence[Pair], pad_id: int, multiple: int = 8) -> dict:
    """A batch of pairs -> LongTensors [B, L], chosen and rejected right-padded to one length L (a multiple of `multiple`).

    Keys: chosen_input_ids, chosen_attention_mask, chosen_labels, rejected_input_ids, rejected_attention_mask,
    rejected_labels. One common L lets the policy run chosen and rejected as one forward of 2B rows.
    """
    import torch

    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    length = pad_length(pairs, multiple)
    out = {}
    for side in SIDES:
        rows = [(getattr(p, f"{side}_ids"), getattr(p, f"{side}_labels")) for p in pairs]
        out[f"{side}_input_ids"] = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _ in rows])
        out[f"{side}_attention_mask"] = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows])
        out[f"{side}_labels"] = torch.tensor([lab + [IGNORE] * (length - len(lab)) for _, lab in rows])
    return out


def pair_ids(record: dict, tokenizer, cfg: Optional[DpoConfig] = None, eos_id: Optional[int] = None) -> Pair:
    """The Pair of one record, no cleaning (inspection, tests)."""
    cfg = cfg or DpoConfig()
    return encode_pair(record, tokenizer, cfg, tokenizer.eos_token_id if eos_id is None else eos_id)
