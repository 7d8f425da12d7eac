"""Task sft: chat / prompt-response records, loss only on response tokens, whole examples per packed row."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, lm_overrides

DATA = ROOT / "data" / "pydocs-faq-sft.jsonl"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_lm_tokenizer):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_lm_tokenizer)
    assert not t.chat_template
    return t


@pytest.fixture(scope="module")
def chat_tok(tiny_lm_tokenizer):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_lm_tokenizer)
    t.chat_template = TEMPLATE
    return t


def _records(n: int) -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


def _write(tmp_path, records, name="sft.jsonl"):
    f = tmp_path / name
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f


def _cfg(path, *extra):
    from shardtune.config import load_config

    over = [f"data.sources=[{{path: {path}}}]", "data.emit_doc_ids=true", *extra]
    return load_config(None, ["task=sft", "model.name_or_path=x", *over]).data


def _all(cfg, tokenizer, batch_size=2):
    from shardtune.data.stream import StreamLoader

    loader = StreamLoader(cfg, tokenizer, batch_size=batch_size)
    return list(loader), loader.stats()


def _expected_plain(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Independently: the fallback template's prompt part, then the response + EOS (trained on)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = enc(f"### Instruction:\n{prompt}\n\n### Response:\n")
    resp = enc(response) + [tokenizer.eos_token_id]
    return head + resp, [-100] * len(head) + resp


def _rows_by_doc(batches):
    """{doc id: (row key, ids, labels)}; asserts no document spans two rows."""
    found: dict[int, tuple] = {}
    for b, batch in enumerate(batches):
        for r in range(batch["input_ids"].shape[0]):
            docs = batch["doc_ids"][r].tolist()
            for g in sorted(set(docs) - {-1}):
                idx = [i for i, d in enumerate(docs) if d == g]
                assert idx == list(range(idx[0], idx[-1] + 1))
                assert g not in found, f"document {g} crosses a row boundary"
                found[g] = ((b, r), batch["input_ids"][r, idx].tolist(), batch["labels"][r, idx].tolist())
            pad = [i for i, d in enumerate(docs) if d == -1]
            assert all(batch["labels"][r, i] == -100 for i in pad)
    return found


def test_plain_template_labels_only_response_tokens_and_whole_examples(tmp_path, tok):
    recs = _records(12)
    cfg = _cfg(_write(tmp_path, recs), "data.seq_len=160")
    batches, stats = _all(cfg, tok)
    found = _rows_by_doc(batches)
    kept = 0
    for g, rec in enumerate(recs):
        ids, labels = _expected_plain(tok, rec["prompt"], rec["response"])
        if len(ids) > 160:
            assert g not in found
            continue
        kept += 1
        _, got_ids, got_labels = found[g]
        assert got_ids == ids and got_labels == labels
    assert kept >= 6 and len({key for key, _, _ in found.values()}) < kept  # several examples share rows
    assert stats["data/documents"] == kept and stats.get("data/dropped/too_long", 0) == len(recs) - kept


def test_chat_template_masks_system_and_user_turns(tmp_path, chat_tok):
    from shardtune.data.sft import example_ids

    conv = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Why are Python strings immutable?"},
        {"role": "assistant", "content": "There are several advantages."},
        {"role": "user", "content": "Name one."},
        {"role": "assistant", "content": "Strings can be dictionary keys."},
    ]}
    cfg = _cfg(_write(tmp_path, [conv, {"prompt": "Is None a singleton?", "response": "Yes."}]), "data.seq_len=128")
    batches, _ = _all(cfg, chat_tok)
    found = _rows_by_doc(batches)
    # Independently: the response tokens are exactly what rendering with the assistant turn adds to rendering
    # without it (with the generation prompt), here token-aligned because the template ends turns with <eos>\n.
    msgs = conv["messages"]
    full = chat_tok.apply_chat_template(msgs, tokenize=False)
    assert found[0][1] == chat_tok(full, add_special_tokens=False)["input_ids"]
    want = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = chat_tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            after = chat_tok.apply_chat_template(msgs[: i + 1], tokenize=False)
            want += chat_tok(after[len(before):], add_special_tokens=False)["input_ids"]
    got = [x for x in found[0][2] if x != -100]
    assert got == want and chat_tok.decode(got) == "There are several advantages.<eos>\nStrings can be dictionary keys.<eos>\n"
    ids, labels = example_ids({"prompt": "Is None a singleton?", "response": "Yes."}, chat_tok)
    assert (found[1][1], found[1][2]) == (ids, labels) and chat_tok.decode([x for x in labels if x != -100]) == "Yes.<eos>\n"


def test_bad_records_are_dropped_and_counted(tmp_path, tok):
    good = {"prompt": "What is Python?", "response": "A programming language."}
    bad = [
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},  # no content
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},  # no role
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # unknown role
        {"messages": "not a list"},
        {"prompt": "only a prompt"},
        {"prompt": "Why?", "response": "   "},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        "[1, 2]",  # not an object: a bad record of the reader
        "{not json",
    ]
    cfg = _cfg(_write(tmp_path, [good, *bad, good]), "data.seq_len=64")
    batches, stats = _all(cfg, tok)
    assert stats["data/documents"] == 2 and len(_rows_by_doc(batches)) == 2
    assert stats["data/dropped/bad_message"] == 5
    assert stats["data/dropped/empty_response"] == 2
    assert stats["data/dropped/no_assistant"] == 1
    assert stats["data/dropped/not_object"] == 1 and stats["data/dropped/invalid_json"] == 1


def test_too_long_example_dropped_or_truncated(tmp_path, tok):
    long_prompt = {"prompt": "word " * 200, "response": "Short answer."}
    long_answer = {"prompt": "Explain.", "response": "Because " * 100}
    short = {"prompt": "Hi?", "response": "Hello."}
    f = _write(tmp_path, [long_prompt, long_answer, short])
    batches, stats = _all(_cfg(f, "data.seq_len=48"), tok)
    assert stats["data/dropped/too_long"] == 2 and stats["data/documents"] == 1
    assert set(_rows_by_doc(batches)) == {2}

    batches, stats = _all(_cfg(f, "data.seq_len=48", "data.sft.too_long=truncate"), tok)
    found = _rows_by_doc(batches)
    assert stats["data/dropped/too_long"] == 1 and stats["data/repaired/truncated"] == 1  # the prompt alone is too long
    ids, labels = _expected_plain(tok, long_answer["prompt"], long_answer["response"])
    assert found[1][1] == ids[:48] and found[1][2] == labels[:48] and len(found[1][1]) == 48
    assert found[2][1] == _expected_plain(tok, short["prompt"], short["response"])[0]


def test_resume_mid_stream_gives_the_same_batches(tmp_path, tok):
    from shardtune.data.stream import StreamLoader

    cfg = _cfg(_write(tmp_path, _records(30)), "data.seq_len=128", "data.shuffle_block=8")
    whole = list(StreamLoader(cfg, tok, batch_size=2))
    first = StreamLoader(cfg, tok, batch_size=2)
    head = [first.next() for _ in range(2)]
    rest = list(StreamLoader(cfg, tok, batch_size=2, state=first.state_dict()))
    assert len(whole) == len(head) + len(rest) > 3
    for a, b in zip(whole, head + rest):
        assert all((a[k] == b[k]).all() for k in a)


def test_config_task_sft(tmp_path):
    from shardtune.config import ConfigError, load_config

    cfg = load_config(ROOT / "configs" / "smollm2-sft-lora.yaml")
    assert cfg.task == "sft" and cfg.data.sft.format == "prompt_response" and cfg.model.lora is not None
    with pytest.raises(ConfigError, match="data.sft.too_long"):
        load_config(ROOT / "configs" / "smollm2-sft-lora.yaml", ["data.sft.too_long=split"])
    with pytest.raises(ConfigError, match="task sft"):
        load_config(None, ["task=causal_lm", "data.sources=[{path: x}]", "data.sft.format=chat"])


def test_sft_training_run_loss_decreases(run_cli, tiny_lm_tokenizer, tmp_path):
    small = _write(tmp_path, _records(8))
    yaml = tmp_path / "sft.yaml"
    yaml.write_text("task: sft\n")
    over = lm_overrides(tiny_lm_tokenizer, small, tmp_path / "r", **{
        "task": "sft", "data.holdout": 0, "data.seq_len": 128, "data.on_source_end": "repeat",
        "train.max_steps": 40, "train.log_every": 5, "optim.lr": 1e-2, "optim.weight_decay": 0.0,
    })
    code, out, err = run_cli("train", yaml, *over)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0], losses
    assert [r for r in rows if "train/loss" in r][-1]["data/response_tokens"] > 0


def test_two_ranks_split_examples_exactly_once(tmp_path, tok):
    from shardtune.data.stream import StreamLoader, lockstep

    cfg = _cfg(_write(tmp_path, _records(24)), "data.seq_len=320")
    single = set(_rows_by_doc(_all(cfg, tok, batch_size=1)[0]))
    loaders = [StreamLoader(cfg, tok, rank=r, world_size=2, num_workers=0, batch_size=1) for r in range(2)]
    seen: list[int] = []
    for step in lockstep(loaders, uneven="pad"):
        for batch in step:
            seen += sorted(set(batch["doc_ids"].flatten().tolist()) - {-1})
    assert sorted(seen) == sorted(single) and len(single) > 10
