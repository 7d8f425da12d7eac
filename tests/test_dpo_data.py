"""DPO data: preference records (text and TRL's chat forms) -> tokenized pairs, drops by reason, the collate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from test_sft import chat_tok, tok  # noqa: F401  (the same tiny tokenizer fixtures, plain and with a chat template)

DATA = ROOT / "data" / "pydocs-faq-dpo.jsonl"


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cfg(**kw):
    from shardtune.config import DpoConfig

    return DpoConfig(**kw)


def run_pairs(records, tokenizer, dpo):
    """(kept pairs by index, summed counts) through encode_records, as the DPO task calls it (one record at a time
    here, to know which ones were kept)."""
    from shardtune.config import CleanConfig
    from shardtune.data.dpo import encode_records

    kept, counts = {}, {}
    for i, record in enumerate(records):
        pairs, got = encode_records([(i, record)], tokenizer, dpo, CleanConfig(), tokenizer.eos_token_id)
        for k, v in got.items():
            counts[k] = counts.get(k, 0) + v
        if pairs:
            kept[i] = pairs[0]
    return kept, counts


def test_text_pair_plain_fallback(tok):
    from shardtune.data.dpo import pair_ids

    rec = {"prompt": "How do I copy a file?", "chosen": "Use shutil.copy().", "rejected": "You cannot."}
    pair = pair_ids(rec, tok)
    head = enc(tok, f"### Instruction:\n{rec['prompt']}\n\n### Response:\n")  # independently: sft.py's fallback template
    for side, ids, labels in (("chosen", pair.chosen_ids, pair.chosen_labels), ("rejected", pair.rejected_ids, pair.rejected_labels)):
        resp = enc(tok, rec[side]) + [tok.eos_token_id]
        assert ids == head + resp and labels == [-100] * len(head) + resp


def test_chat_forms_explicit_and_implicit_prompt_agree_and_train_only_the_response(chat_tok):
    from shardtune.data.dpo import pair_ids

    prompt = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Are strings mutable?"},
        {"role": "assistant", "content": "No, they are immutable."},
        {"role": "user", "content": "Why?"},
    ]
    chosen = [{"role": "assistant", "content": "So they can be dictionary keys."}]
    rejected = [{"role": "assistant", "content": "Because."}]
    explicit = pair_ids({"prompt": prompt, "chosen": chosen, "rejected": rejected}, chat_tok)
    implicit = pair_ids({"chosen": prompt + chosen, "rejected": prompt + rejected}, chat_tok)
    assert explicit == implicit
    for ids, labels, response in ((explicit.chosen_ids, explicit.chosen_labels, chosen), (explicit.rejected_ids, explicit.rejected_labels, rejected)):
        full = chat_tok.apply_chat_template(prompt + response, tokenize=False)
        head = chat_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert ids == enc(chat_tok, head) + enc(chat_tok, full[len(head):])
        trained = [x for x in labels if x != -100]
        assert chat_tok.decode(trained) == response[0]["content"] + "<eos>\n"  # not the prompt's assistant turn
    n = len(enc(chat_tok, head))
    assert explicit.chosen_ids[:n] == explicit.rejected_ids[:n]  # the two sides share the prompt's tokens


def test_text_prompt_with_chat_responses(chat_tok):
    from shardtune.data.dpo import pair_ids

    a = pair_ids({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, chat_tok)
    b = pair_ids({"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
                  "rejected": [{"role": "assistant", "content": "Go away."}]}, chat_tok)
    assert a == b


def test_bad_records_dropped_and_counted_by_reason(tok):
    good = {"prompt": "What is Python?", "chosen": "A programming language.", "rejected": "A snake."}
    user = lambda t: {"role": "user", "content": t}  # noqa: E731
    bot = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    bad = [
        {"prompt": "q", "chosen": "a"},  # no rejected
        {"chosen": "a", "rejected": "b"},  # text responses without a prompt
        {"prompt": "q", "chosen": 3, "rejected": "b"},
        {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": [user("more?")], "rejected": "b"},  # a response without an assistant turn
        {"prompt": "q", "chosen": "   ", "rejected": "b"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a")]},
        [1, 2],  # a JSON record that is not an object
    ]
    kept, counts = run_pairs([good, *bad, good], tok, cfg())
    assert sorted(kept) == [0, len(bad) + 1] and counts["data/documents"] == 2
    assert counts["data/dropped/bad_message"] == 5
    assert counts["data/dropped/no_assistant"] == 1
    assert counts["data/dropped/empty_response"] == 1
    assert counts["data/dropped/same_responses"] == 2
    pair = kept[0]
    assert counts["data/response_tokens"] == 2 * sum(x != -100 for x in pair.chosen_labels + pair.rejected_labels)


def test_too_long_pairs_dropped_or_response_tails_cut(tok):
    from shardtune.data.dpo import pair_ids

    long_prompt = {"prompt": "word " * 100, "chosen": "Yes.", "rejected": "No."}
    long_answer = {"prompt": "Explain.", "chosen": "Because " * 60, "rejected": "No."}
    short = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."}
    kept, counts = run_pairs([long_prompt, long_answer, short], tok, cfg(max_length=40))
    assert sorted(kept) == [2] and counts["data/dropped/too_long"] == 2

    kept, counts = run_pairs([long_prompt, long_answer, short], tok, cfg(max_length=40, too_long="truncate"))
    assert sorted(kept) == [1, 2] and counts["data/dropped/too_long"] == 1 and counts["data/repaired/truncated"] == 1
    whole = pair_ids(long_answer, tok, cfg(max_length=10_000))
    cut = kept[1]
    assert cut.chosen_ids == whole.chosen_ids[:40] and cut.chosen_labels == whole.chosen_labels[:40]
    assert cut.rejected_ids == whole.rejected_ids and len(whole.rejected_ids) < 40  # the short side is untouched
    assert kept[2] == pair_ids(short, tok)


def test_collate_pads_both_sides_to_one_length_multiple_of_8(tok):
    import torch

    from shardtune.data.dpo import Pair, collate_pairs

    pairs = [Pair([1, 2, 3], [-100, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [-100, -100, 3, 4, 5, 6, 7, 8, 9]), Pair([4], [4], [5, 6], [-100, 6])]
    b = collate_pairs(pairs, pad_id=0)
    assert set(b) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")}
    assert all(t.dtype == torch.long and t.shape == (2, 16) for t in b.values())
    assert b["chosen_input_ids"][0].tolist() == [1, 2, 3] + [0] * 13
    assert b["chosen_attention_mask"][1].tolist() == [1] + [0] * 15
    assert b["rejected_labels"][0].tolist() == [-100, -100, 3, 4, 5, 6, 7, 8, 9] + [-100] * 7
    assert b["rejected_attention_mask"][0].sum() == 9 and b["rejected_input_ids"][1].tolist() == [5, 6] + [0] * 14
    assert collate_pairs(pairs[1:], pad_id=0)["chosen_input_ids"].shape == (1, 8)


def test_dpo_config_fields():
    from pydantic import ValidationError

    from shardtune.config import DpoConfig

    d = DpoConfig()
    assert (d.beta, d.prompt_field, d.chosen_field, d.rejected_field, d.too_long) == (0.1, "prompt", "chosen", "rejected", "drop")
    with pytest.raises(ValidationError):
        DpoConfig(beta=0)
    with pytest.raises(ValidationError):
        DpoConfig(too_long="split")
    with pytest.raises(ValidationError):
        DpoConfig(bta=0.2)


def test_shipped_pairs_are_rebuilt_identically_and_all_usable(tmp_path):
    """data/make_pydocs_dpo.py is deterministic, and every shipped pair fits the shipped config's max_length."""
    import yaml
    from transformers import AutoTokenizer

    from shardtune.assets import packaged_model
    from shardtune.config import DpoConfig
    from shardtune.data.dpo import pair_ids

    out = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, str(ROOT / "data" / "make_pydocs_dpo.py"), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == DATA.read_bytes()
    records = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len(records) >= 100 and all(r["chosen"] != r["rejected"] for r in records)
    dpo = yaml.safe_load((ROOT / "configs" / "smollm2-dpo-lora.yaml").read_text())["data"]["dpo"]
    tokenizer = AutoTokenizer.from_pretrained(packaged_model("smollm2-135m"))
    shipped = DpoConfig(**dpo)
    for r in records:
        pair = pair_ids(r, tokenizer, shipped)  # a pair the config would drop raises Drop here
        assert max(len(pair.chosen_ids), len(pair.rejected_ids)) <= shipped.max_length
