"""SFT shaping: chat / prompt-response records -> token ids + labels that train on responses only.

One record is one example is one document of the stream (docstream.py), so
partitioning, shuffling, hold-out and the resumable state are the
document-level machinery unchanged; the reader hands over the whole record
as JSON text (readers.field_text with no field) and this module parses,
renders and tokenizes it. Records come from jsonl/json, csv/tsv (columns as
fields), parquet or hub data sets.

Records (per `data.sft.format`; auto decides per record by which field it has):
    chat              {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    prompt_response   {"prompt": str, "response": str}  (= one user turn and one assistant turn)

Rendering:
- the tokenizer has a chat template (`tokenizer.chat_template`): the text is
  `apply_chat_template(messages, tokenize=False)`. Assistant turn i spans the
  characters from the end of the render of messages[:i] with
  add_generation_prompt=True to the end of the render of messages[:i+1]; so a
  response includes the template's end-of-turn text (e.g. `<|im_end|>\\n`),
  and no extra EOS is appended. A template whose partial renders are not
  prefixes of the whole render cannot be masked: the example is dropped
  (`data/dropped/template_mismatch`).
- no chat template: the plain fallback
      "### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}{eos}"
  (a system turn renders as "### System:\\n{content}\\n\\n" before it; more
  turns repeat the pattern, separated by "\\n\\n"), the EOS id after each
  response.
Each span is tokenized on its own (add_special_tokens=False) and the ids are
concatenated, so the boundaries are exact. Labels are the ids on response
spans (incl. their EOS / end-of-turn) and IGNORE everywhere else (system and
user turns, template text). Turns after the last assistant turn are dropped
(nothing would learn from them).

Drops (counted as `data/dropped/<reason>`; a dropped example has no tokens,
so it counts as no document, pack.finish): bad_message (no messages list / prompt-response fields, or a turn
without a known role or text content), no_assistant, empty_response,
too_long (longer than seq_len with too_long: drop, or with truncate when not
one response token is left). too_long: truncate cuts the tail and counts
`data/repaired/truncated`. Each turn's text goes through the clean stage's
repairs (NFC, control characters; clean.normalize).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from shardtune.config import CleanConfig, SftConfig
from shardtune.data.clean import Counts, normalize
from shardtune.data.docstream import Doc
from shardtune.data.pack import IGNORE, PackOptions, TokDoc, finish, pretokenized

ROLES = ("system", "user", "assistant")
FALLBACK_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}


class Drop(Exception):
    """An example that cannot be used; args[0] is the reason (a metric suffix)."""


def parse_messages(record: Any, cfg: SftConfig) -> list[dict]:
    """The record's turns as [{"role", "content"}, ...]; raises Drop(reason)."""
    if not isinstance(record, dict):
        raise Drop("bad_message")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "chat" if cfg.messages_field in record else "prompt_response"
    if fmt == "chat":
        messages = record.get(cfg.messages_field)
        if not isinstance(messages, list) or not messages:
            raise Drop("bad_message")
    else:
        prompt, response = record.get(cfg.prompt_field), record.get(cfg.response_field)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise Drop("bad_message")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise Drop("bad_message")
        out.append({"role": m["role"], "content": m["content"]})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise Drop("no_assistant")
    out = out[: last + 1]
    if any(m["role"] == "assistant" and not m["content"].strip() for m in out):
        raise Drop("empty_response")
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_spans(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """(text, is_response) spans whose concatenation is the rendered example (EOS ids are added by encode)."""
    if not has_chat_template(tokenizer):
        spans: list[tuple[str, bool]] = []
        for i, m in enumerate(messages):
            sep = "\n\n" if i + 1 < len(messages) else ""
            if m["role"] == "assistant":
                spans += [(FALLBACK_HEADERS["assistant"], False), (m["content"], True), (sep, False)]
            else:
                spans.append((FALLBACK_HEADERS[m["role"]] + m["content"] + "\n\n", False))
        return [s for s in spans if s[0] or s[1]]

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans, at = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            head = render(messages[:i], True)
        except Exception:  # noqa: BLE001  templates may refuse a conversation that starts with the assistant
            raise Drop("template_mismatch") from None
        upto = render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(head) and len(head) >= at and len(upto) > len(head)):
            raise Drop("template_mismatch")
        spans += [(full[at : len(head)], False), (full[len(head) : len(upto)], True)]
        at = len(upto)
    spans.append((full[at:], False))
    return [s for s in spans if s[0]]


def encode(messages: list[dict], tokenizer, eos_id: int, train_from: int = 0) -> tuple[list[int], list[int]]:
    """-> (input ids, labels) of one example; labels are IGNORE off the response spans.

    Only assistant turns at message index >= train_from are trained on (DPO: the turns of the prompt are
    context, the completion after them is the response); earlier ones render the same, labelled IGNORE.
    """
    turns = iter([i >= train_from for i, m in enumerate(messages) if m["role"] == "assistant"])
    spans: list[tuple[str, bool, bool]] = []  # (text, is a response span, trained)
    for text, is_resp in render_spans(messages, tokenizer):  # adjacent prompt-side spans tokenize as one text
        if spans and not is_resp and not spans[-1][1]:
            spans[-1] = (spans[-1][0] + text, False, False)
        else:
            spans.append((text, is_resp, is_resp and next(turns)))
    fallback = not has_chat_template(tokenizer)
    texts = [t for t, _, _ in spans if t]
    enc = iter(tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]) if texts else iter(())
    ids: list[int] = []
    labels: list[int] = []
    for text, is_resp, trained in spans:
        piece = list(next(enc)) if text else []
        if is_resp and fallback:
            piece.append(eos_id)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def shape_example(text: str, tokenizer, sft: SftConfig, clean: CleanConfig, opt: PackOptions, counts: Counts) -> tuple[list[int], list[int]]:
    """One record's JSON text -> (ids, labels) fitting in opt.seq_len; raises Drop(reason). Repairs go to counts."""
    try:
        record = json.loads(text, strict=False)
    except json.JSONDecodeError:
        raise Drop("bad_message") from None
    messages = parse_messages(record, sft)
    for m in messages:
        m["content"] = normalize(m["content"], clean, counts)
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise Drop("empty_response")
    ids, labels = encode(messages, tokenizer, opt.eos_id)
    if len(ids) > opt.seq_len:
        if sft.too_long == "drop":
            raise Drop("too_long")
        ids, labels = ids[: opt.seq_len], labels[: opt.seq_len]
        if all(x == IGNORE for x in labels):
            raise Drop("too_long")
        counts["data/repaired/truncated"] = counts.get("data/repaired/truncated", 0) + 1
    return ids, labels


def _dropped(doc: Doc, reason: str) -> TokDoc:
    doc.counts[f"data/dropped/{reason}"] = doc.counts.get(f"data/dropped/{reason}", 0) + 1
    return TokDoc(doc, [], [])


def shape_document(doc: Doc, tokenizer, sft: SftConfig, clean: CleanConfig, opt: PackOptions) -> TokDoc:
    """One example's TokDoc (one piece, with labels; empty when dropped), its shaping counts in doc.counts."""
    if not doc.pieces:  # dropped by the clean stage, or the end marker
        return TokDoc(doc, [], [])
    counts: Counts = {}
    try:
        ids, labels = shape_example(doc.pieces[0], tokenizer, sft, clean, opt, counts)
    except Drop as exc:
        return _dropped(doc, exc.args[0])
    for key, n in counts.items():
        doc.counts[key] = doc.counts.get(key, 0) + n
    return TokDoc(doc, ids, [0], labels)


def tokenize_examples(docs: Iterator[Doc], tokenizer, sft: SftConfig, clean: CleanConfig, opt: PackOptions) -> Iterator[TokDoc]:
    """The SFT counterpart of pack.tokenize_documents (pretokenized documents pass through)."""
    for doc in docs:
        yield pretokenized(doc) if doc.tokens is not None else finish(shape_document(doc, tokenizer, sft, clean, opt))


def example_ids(record: dict, tokenizer, sft: Optional[SftConfig] = None, eos_id: Optional[int] = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of one record, unpacked and untruncated (inspection, tests)."""
    sft = sft or SftConfig()
    return encode(parse_messages(record, sft), tokenizer, tokenizer.eos_token_id if eos_id is None else eos_id)
