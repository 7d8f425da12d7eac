"""The pretokenized cache: the same rows (and losses) as the raw sources on any layout, refused when it does
not fit the config or is stale, built by several processes (disjoint partitions, no collective), and an
interrupted build that completes. Real files, the packaged MiniLM tokenizer; builds in subprocesses where
the CLI does them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shardtune import ShardtuneError
from shardtune.config import load_config
from shardtune.data.cache import build
from shardtune.data.partitions import deal
from shardtune.data.stream import StreamLoader, lockstep
from shardtune.preprocess import load_tokenizer, packed, preprocess

from conftest import lm_overrides, one_sentence

WORDS = "river stone cloud maple ember frost harbor lantern meadow quill".split()


def doc(i: int) -> str:
    return f"doc{i} " + " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + (i * 7) % 23))


def write_config(tmp_path: Path, n: int = 300, task: str = "causal_lm", **data) -> Path:
    texts = [doc(i) for i in range(n)] + ["", doc(3), "\x00", doc(n - 1)]  # empty, copies (one in the same partition)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" + ("{bad\n" if i == 40 else "") for i, t in enumerate(texts)))
    (tmp_path / "b.txt").write_text("".join(doc(1000 + i) + "\n" for i in range(n // 2)))
    raw = {"task": task, "model": {"name_or_path": "minilm-l6"},
           "data": {"sources": [{"path": str(tmp_path / "a.jsonl"), "weight": 2}, {"path": str(tmp_path / "b.txt")}],
                    "seq_len": 32, "partition_bytes": 2048, "shuffle_block": 6, "holdout": 12, "clean": {"dedup": True}, **data}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cfg = load_config(write_config(tmp))
    preprocess(cfg, show=0, write=tmp / "cache", echo=lambda s: None)
    return cfg, load_tokenizer(cfg), tmp / "cache"


def rows(cfg, tok, world, workers, split="train", **kw):
    ls = [StreamLoader(cfg, tok, split=split, rank=r, world_size=world, num_workers=workers, batch_size=3, **kw) for r in range(world)]
    return [list(ld) for ld in ls] if split == "train" else list(lockstep(ls, uneven="pad")), ls


def equal(a, b) -> bool:
    flat = lambda x: [t for r in x for t in (r if isinstance(r, list) else [r])]  # noqa: E731
    a, b = flat(a), flat(b)
    return len(a) == len(b) > 0 and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_cache_gives_the_stream_rows_and_counts(built, world, workers):
    cfg, tok, root = built
    for data in (cfg.data, cfg.data.model_copy(update={"doc_positions": True, "split_documents": False, "emit_doc_ids": True})):
        raw, raw_loaders = rows(data, tok, world, workers)
        cached, cached_loaders = rows(packed(data, root, "train"), tok, world, workers)
        assert equal(raw, cached)
        assert [ld.stats() for ld in raw_loaders] == [ld.stats() for ld in cached_loaders]  # drops, repairs, bad records too
        assert equal(rows(data, tok, world, 0, split="validation")[0], rows(packed(data, root, "train"), tok, world, 0, split="validation")[0])


def test_resume_from_a_cache_position(built):
    cfg, tok, root = built
    data = packed(cfg.data.model_copy(update={"on_source_end": "repeat", "max_documents": 500}), root, "train")
    (full,), _ = rows(data, tok, 1, 2)
    first = StreamLoader(data, tok, num_workers=2, batch_size=3)
    head = [first.next() for _ in range(len(full) // 3)]
    tail = list(StreamLoader(data, tok, num_workers=2, batch_size=3, state=first.state_dict()))  # resumed by record index
    assert equal(head + tail, full)


def test_sft_cache(tmp_path):
    recs = [{"prompt": f"question {i}?", "response": doc(i)} for i in range(60)] + [{"prompt": "no answer"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, ["task=sft", "model.name_or_path=minilm-l6", f"data.sources=[{{path: {tmp_path / 's.jsonl'}}}]",
                             "data.seq_len=64", "data.partition_bytes=2048"])
    tok = load_tokenizer(cfg)
    build(cfg.data, tok, tmp_path / "c")
    raw, raw_loaders = rows(cfg.data, tok, 2, 0)
    cached, cached_loaders = rows(packed(cfg.data, tmp_path / "c", "train"), tok, 2, 0)
    assert equal(raw, cached) and [ld.stats() for ld in raw_loaders] == [ld.stats() for ld in cached_loaders]
    assert sum(ld.stats()["data/response_tokens"] for ld in cached_loaders) > 0
    with pytest.raises(ShardtuneError, match=r"data.seq_len: 64 in the cache, 128 here"):  # SFT drops depend on seq_len
        StreamLoader(packed(cfg.data.model_copy(update={"seq_len": 128}), tmp_path / "c", "train"), tok)


def with_(data, **change):
    return type(data).model_validate(data.model_dump() | change)


def test_cache_that_does_not_fit_is_refused(built, tmp_path, tiny_lm_tokenizer):
    from transformers import AutoTokenizer

    cfg, tok, root = built
    data = packed(cfg.data, root, "train")
    for change, words in [({"clean": {"min_chars": 5, "dedup": True}}, "data.clean.min_chars: 1 in the cache, 5 here"),
                          ({"max_record_bytes": 1000}, "data.max_record_bytes: 16777216 in the cache, 1000 here"),
                          ({"seed": 4}, "data.seed: 0 in the cache, 4 here")]:  # with dedup the hold-out shapes the drops
        with pytest.raises(ShardtuneError, match=words) as err:
            StreamLoader(with_(data, **change), tok)
        assert "\n" not in str(err.value) and "rebuild it with `shardtune preprocess CONFIG --write" in str(err.value)
    StreamLoader(with_(data, seq_len=64, shuffle_block=0, on_source_end="repeat"), tok)  # applied when read: no rebuild
    with pytest.raises(ShardtuneError, match="was built with another tokenizer"):
        StreamLoader(data, AutoTokenizer.from_pretrained(tiny_lm_tokenizer))
    with pytest.raises(ShardtuneError, match="holds no cache"):
        StreamLoader(packed(cfg.data, tmp_path, "train"), tok)


def test_stale_cache_is_refused(tmp_path):
    cfg = load_config(write_config(tmp_path))
    tok = load_tokenizer(cfg)
    build(cfg.data, tok, tmp_path / "c")
    StreamLoader(packed(cfg.data, tmp_path / "c", "train"), tok)
    with open(tmp_path / "b.txt", "a") as f:
        f.write("one more line\n")
    with pytest.raises(ShardtuneError, match=r"is stale: its source file .*b.txt changed since it was built"):
        StreamLoader(packed(cfg.data, tmp_path / "c", "train"), tok)


def cli(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "shardtune.cli", *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def part_files(root: Path) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in (root / "parts").glob("*.json")}


def same_cache(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in (a / "parts").iterdir())
    return names == sorted(p.name for p in (b / "parts").iterdir()) and all(
        (a / "parts" / n).read_bytes() == (b / "parts" / n).read_bytes() for n in names if n.endswith(".npy"))


def test_two_process_build_writes_disjoint_partitions(tmp_path, built):
    cfg = load_config(write_config(tmp_path))
    out = []
    report = preprocess(cfg, show=0, write=tmp_path / "c2", processes=2, echo=out.append).report  # two spawned builders
    assert "builders 0-1 of 2 built" in out[0] and report.complete
    metas = part_files(tmp_path / "c2")
    plan_parts = json.loads((tmp_path / "c2" / "build.json").read_text())["table"]
    share = deal([(pid, src, size) for pid, (src, size) in enumerate(plan_parts)], 2)
    assert sorted(metas) == list(range(len(plan_parts))) and len(plan_parts) > 10
    assert {b: sorted(p for p, m in metas.items() if m["builder"] == b) for b in (0, 1)} == {0: sorted(share[0]), 1: sorted(share[1])}
    assert same_cache(tmp_path / "c2", built[2])  # the same bytes as one process' build of the same data


def test_interrupted_build_completes(tmp_path, run_cli):
    cfg_path = write_config(tmp_path)
    # rank 1 of 2 (as under torchrun/srun) dies after its 3rd partition; rank 0 never ran
    env = {"RANK": "1", "WORLD_SIZE": "2", "SHARDTUNE_FAILPOINTS": "kill@cache=3,rank=1"}
    proc = cli("preprocess", cfg_path, "--show", "0", "--write", tmp_path / "c", env=env, check=False)
    assert proc.returncode == -9 and len(part_files(tmp_path / "c")) == 3
    cfg = load_config(cfg_path)
    tok = load_tokenizer(cfg)
    with pytest.raises(ShardtuneError, match=r"is not complete \(3 partitions built\); run `shardtune preprocess CONFIG --write"):
        StreamLoader(packed(cfg.data, tmp_path / "c", "train"), tok)
    code, out, err = run_cli("preprocess", cfg_path, "--show", "1", "--write", tmp_path / "c")  # resume, one process
    total = len(json.loads((tmp_path / "c" / "build.json").read_text())["table"])
    assert code == 0 and f"built {total - 3} of its {total} partitions" in out and "complete" in out and "--- row 1: 32 tokens" in out, err
    build(cfg.data, tok, tmp_path / "fresh")
    assert same_cache(tmp_path / "c", tmp_path / "fresh")
    code, out, _ = run_cli("preprocess", cfg_path, "--show", "0", "--write", tmp_path / "c")  # a complete cache: nothing to do
    assert code == 0 and f"built 0 of its {total} partitions" in out


def test_build_folder_checks(run_cli, tmp_path):
    cfg_path = write_config(tmp_path)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    code, _, err = run_cli("preprocess", cfg_path, "--write", tmp_path / "used")
    one_sentence(code, err, "already exists and is neither empty nor a cache build")
    assert (tmp_path / "used" / "x").read_text() == "keep me"
    assert run_cli("preprocess", cfg_path, "--show", "0", "--write", tmp_path / "c")[0] == 0
    code, _, err = run_cli("preprocess", cfg_path, "data.clean.min_chars=3", "--show", "0", "--write", tmp_path / "c")
    one_sentence(code, err, "holds a cache build with other data settings", "data.clean.min_chars: 1 then, 3 now")


def test_training_from_the_cache_logs_the_same_losses(run_cli, tiny_lm_tokenizer, lm_corpus, tmp_path):
    base = {"data.partition_bytes": 4096, "data.shuffle_block": 8, "train.max_steps": 12, "data.num_workers": 2}
    yaml_path = tmp_path / "lm.yaml"
    yaml_path.write_text("task: causal_lm\n")
    code, _, err = run_cli("preprocess", yaml_path, *lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / "x", **base), "--show", "0", "--write", tmp_path / "c")
    assert code == 0, err
    losses = {}
    for name, extra in [("raw", {}), ("cache", {"data.sources": f"[{{path: {tmp_path / 'c'}, format: packed}}]"})]:
        code, _, err = run_cli("train", yaml_path, *lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / name, **base, **extra))
        assert code == 0, err
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], r["train/loss"]) for r in log if "train/loss" in r] + [(r["step"], r["eval/loss"]) for r in log if "eval/loss" in r]
    assert len(losses["raw"]) >= 12 and losses["raw"] == losses["cache"]
