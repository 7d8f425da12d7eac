"""The settings a saved data position or a packed cache depends on, and how two of them differ.

A leaf of the data stage (it imports only the config tree): the stream
(stream.py) stores stream_settings() in its state and refuses a resume whose
settings differ; the packed cache (packed.py, cache.py) stores what shaped its
tokens and refuses a config that differs; both name the first difference.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any, Optional

from shardtune.config import StreamConfig

# Settings a stream position depends on (not seq_len, batch size or workers: offsets count document tokens).
STREAM_KEYS = ("sources", "validation_sources", "holdout", "seed", "shuffle_block", "on_source_end", "max_documents",
               "max_record_bytes", "partition_bytes", "clean", "eos_token_id", "on_bad_record")

_TOKENIZER_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_id(tokenizer) -> str:
    """A hash of the tokenizer's whole definition (vocabulary, merges, normalizer, special tokens, chat template)."""
    try:
        return _TOKENIZER_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([str(getattr(tokenizer, "chat_template", None)), sorted(map(str, tokenizer.all_special_tokens))])
    out = hashlib.sha256((body + extra).encode()).hexdigest()[:16]
    try:
        _TOKENIZER_IDS[tokenizer] = out
    except TypeError:
        pass
    return out


def flat(value: Any, prefix: str) -> dict[str, Any]:
    """Nested config values as {"data.clean.dedup": False, ...} (lists of sections by index)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}[{i}]").items()} | {f"{prefix}#": len(value)}
    return {prefix: value}


def stream_settings(cfg: StreamConfig, split: str, tokenizer) -> dict[str, Any]:
    keys = set(STREAM_KEYS) | ({"sft", "seq_len"} if cfg.sft is not None else set())  # SFT examples are never split: seq_len drops
    out = flat(cfg.model_dump(mode="json", include=keys), "data")
    return out | {"split": split, "tokenizer": tokenizer_id(tokenizer)}


def first_difference(saved: dict, now: dict, then: str = "then", here: str = "now") -> Optional[str]:
    """'data.seed: 3 then, 4 now' for the first key that differs, or None."""
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            return f"{key}: {saved.get(key)!r} {then}, {now.get(key)!r} {here}"
    return None
