"""`shardtune preprocess`: what the streaming stage makes of a language-model config, and its cache.

    shardtune preprocess CONFIG [KEY=VALUE ...] [--show N] [--write DIR [--processes P]] [--split S] [--max-rows R]

Without --write: one pass of a `StreamLoader` (one process, no workers) over
the split; the first N packed rows are printed decoded, each document marked,
then the stage's rates and counts over the rows streamed (--max-rows, default
the first STATS_ROWS rows).

With --write DIR: the pretokenized cache of the split's sources is built in
DIR (data/cache.py), by P local processes; launched with RANK/WORLD_SIZE in
the environment (torchrun, srun, `shardtune launch`), each rank builds its
share with its P processes, without a process group or any collective:
builders coordinate through the files in DIR, and running the command again
resumes an interrupted build. Then the build's counts are printed and, once
the cache is complete, the first N rows read back from it. Train from it
with `data.sources: [{path: DIR, format: packed}]` (the rest of the data
section as when it was built).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from shardtune import ShardtuneError
from shardtune.config import DEFAULT_MODELS, LM_TASKS, Config, StreamConfig

STATS_ROWS = 1000  # rows streamed for the stats when not writing (a few rows would time mostly start-up)


def stream_config(cfg: Config) -> StreamConfig:
    if cfg.task not in LM_TASKS or not isinstance(cfg.data, StreamConfig):
        raise ShardtuneError(
            f"shardtune preprocess works on language-model data, but this config has task: {cfg.task}; "
            f"set task: {LM_TASKS[0]} with data.sources, or use `shardtune train` for {cfg.task} data."
        )
    return cfg.data


def load_tokenizer(cfg: Config):
    """The run's tokenizer: model.name_or_path resolved like the model (local folder, packaged name, hub)."""
    from transformers import AutoTokenizer

    from shardtune.models import resolve_model

    name = cfg.model.name_or_path or DEFAULT_MODELS[cfg.task]
    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as exc:
        raise ShardtuneError(f"could not load the tokenizer of model {name!r} ({type(exc).__name__}); point model.name_or_path at a folder with a tokenizer.") from None


def packed(scfg: StreamConfig, root: Path, split: str) -> StreamConfig:
    """The same data section reading the cache in root instead of the sources."""
    key = "sources" if split == "train" else "validation_sources"
    return StreamConfig.model_validate(scfg.model_dump() | {key: [{"path": str(root), "format": "packed"}]})


# ---------------------------------------------------------------- one pass


@dataclass
class Pass:
    """The outcome of one preprocessing pass."""

    rows: int = 0
    seconds: float = 0.0  # time inside the stream (reading, cleaning, tokenizing, packing, collating)
    stats: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # the first rows: {"input_ids", "doc_ids"} without padding
    report: object = None  # data.cache.BuildReport with --write


def preprocess(cfg: Config, *, show: int = 3, write: Optional[Path] = None, split: str = "train",
               max_rows: Optional[int] = None, processes: int = 1, echo: Callable[[str], None] = print) -> Pass:
    """Stream `split` once and echo its first `show` rows and stats; with `write`, build its cache there."""
    from shardtune.data.partitions import source_files
    from shardtune.data.stream import StreamLoader

    scfg = stream_config(cfg)
    if show < 0 or (max_rows is not None and max_rows < 1) or processes < 1:
        raise ShardtuneError("--show must be >= 0, --max-rows >= 1 and --processes >= 1.")
    if write is None and show == 0:
        raise ShardtuneError("nothing to do: pass --show N to see rows and/or --write DIR to cache them.")
    if write is not None and max_rows is not None:
        raise ShardtuneError("--max-rows cuts the --show pass; a cache always holds whole partitions: drop --max-rows or --write.")
    unpacked = [s for s in scfg.sources + scfg.validation_sources if s.format != "packed"]
    source_files(unpacked, scfg.sft is not None)  # fail on a bad source before loading a tokenizer
    tokenizer = load_tokenizer(cfg)
    result = Pass()
    if write is not None:
        result.report = write_cache(cfg, tokenizer, write, split, processes, echo)
        if not result.report.complete or show == 0:
            return result
        scfg = packed(scfg, write, split)
    limit = max_rows if max_rows is not None else max(show, STATS_ROWS)
    loader = StreamLoader(scfg.model_copy(update={"emit_doc_ids": True}), tokenizer, split=split, batch_size=1)
    result = _stream(loader, limit, show, echo, result)
    echo(format_stats(result, scfg.seq_len))
    return result


def _stream(loader, limit: int, show: int, echo: Callable[[str], None], result: Pass) -> Pass:
    for batch in _timed_rows(loader, limit, result):
        if len(result.samples) < show:
            keep = batch["doc_ids"][0] >= 0
            sample = {"input_ids": batch["input_ids"][0][keep].tolist(), "doc_ids": batch["doc_ids"][0][keep].tolist()}
            prev_last = result.samples[-1]["doc_ids"][-1] if result.samples and result.samples[-1]["doc_ids"] else None
            echo(format_sample(len(result.samples), sample, prev_last, loader.tokenizer, loader.opt.eos_id))
            result.samples.append(sample)
    result.stats = loader.stats()
    return result


def _timed_rows(loader, limit: int, result: Pass) -> Iterator[dict]:
    """The loader's batches, cut at `limit` rows; the time spent producing them goes into result.seconds."""
    while result.rows < limit:
        start = time.perf_counter()
        more = loader.peek() is not None
        batch = loader.next() if more else None
        result.seconds += time.perf_counter() - start
        if batch is None:
            return
        result.rows += len(batch["input_ids"])
        yield batch


# ---------------------------------------------------------------- what is printed


def _segments(sample: dict) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for tok, g in zip(sample["input_ids"], sample["doc_ids"]):
        if out and out[-1][0] == g:
            out[-1][1].append(tok)
        else:
            out.append((g, [tok]))
    return out


def format_sample(index: int, sample: dict, prev_last: Optional[int], tokenizer, eos_id: int) -> str:
    """One packed row, decoded per document: `[doc G]` starts each document's tokens in the row.

    prev_last: the document the previous row ended with (None for the first row).
    """
    segs = _segments(sample)
    lines = [f"--- row {index + 1}: {len(sample['input_ids'])} tokens, {len(segs)} document(s) ---"]
    for k, (g, ids) in enumerate(segs):
        notes = []
        if k == 0 and g == prev_last:
            notes.append("continued")
        if ids[-1] != eos_id:
            notes.append("continues in the next row")
        head = f"[doc {g}{', ' + ', '.join(notes) if notes else ''}]"
        lines.append(f"{head} {tokenizer.decode(ids, skip_special_tokens=False)}")
    return "\n".join(lines)


def _group(stats: dict, kind: str) -> str:
    prefix = f"data/{kind}/"
    items = [(k[len(prefix):], v) for k, v in stats.items() if k.startswith(prefix)]
    return ", ".join(f"{k} {v:,}" for k, v in sorted(items)) or "none"


def format_stats(result: Pass, seq_len: int) -> str:
    s, secs = result.stats, max(result.seconds, 1e-9)
    docs, tokens = s.get("data/documents", 0), s.get("data/tokens", 0)
    return "\n".join([
        f"stream: {docs:,} documents -> {result.rows:,} rows of {seq_len} tokens ({tokens:,} tokens) in {result.seconds:.2f} s",
        f"  docs/s: {docs / secs:,.1f}",
        f"  tokens/s: {tokens / secs:,.0f}",
        f"  packing efficiency: {s.get('data/packing_efficiency', 0.0):.2%} of row tokens are not padding",
        f"  dropped: {_group(s, 'dropped')}",
        f"  repaired: {_group(s, 'repaired')}",
        f"  skipped: {_group(s, 'skipped')}",
    ])


# ---------------------------------------------------------------- the cache, built in parallel


def builders(processes: int) -> tuple[list[int], int]:
    """This process's builder ids and the number of builders: P per rank, ranks from RANK/WORLD_SIZE."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ShardtuneError("RANK and WORLD_SIZE must be integers when set; unset them to build in one process.") from None
    if not 0 <= rank < world:
        raise ShardtuneError(f"RANK {rank} is outside WORLD_SIZE {world}; launch the ranks with 0 <= RANK < WORLD_SIZE.")
    return [rank * processes + i for i in range(processes)], world * processes


def _builder_main(cfg_dict: dict, root: str, split: str, builder: int, total: int, queue) -> None:
    """One spawned builder process: its share, then (report or error sentence) into the queue."""
    from shardtune.config import validate
    from shardtune.data.cache import build

    try:
        cfg = validate(cfg_dict)
        queue.put((builder, build(cfg.data, load_tokenizer(cfg), Path(root), split, builder, total), None))
    except ShardtuneError as exc:
        queue.put((builder, None, str(exc)))


def write_cache(cfg: Config, tokenizer, root: Path, split: str, processes: int, echo: Callable[[str], None]):
    """Build this process's share(s) of the cache; -> the combined BuildReport."""
    import multiprocessing

    from shardtune.data.cache import BuildReport, build, finish_if_done

    ids, total = builders(processes)
    if processes == 1:
        reports = [build(cfg.data, tokenizer, root, split, ids[0], total)]
    else:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked tokenizer threads
        queue = ctx.Queue()
        procs = [ctx.Process(target=_builder_main, args=(cfg.to_dict(), str(root), split, b, total, queue)) for b in ids]
        for p in procs:
            p.start()
        got = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        errors = [e for _, _, e in got if e]
        if errors or any(p.exitcode for p in procs):
            raise ShardtuneError(errors[0] if errors else f"a cache builder process died (exit code {[p.exitcode for p in procs]}); run the command again to resume the build.")
        reports = [r for _, r, _ in sorted(got, key=lambda g: g[0])]
    complete = finish_if_done(root) is not None
    totals: dict = {}
    for r in reports:
        for k, v in r.totals.items():
            totals[k] = totals.get(k, 0) + v
    report = BuildReport([p for r in reports for p in r.built], sum(r.mine for r in reports), reports[0].total,
                         max(r.done for r in reports), max(r.seconds for r in reports), complete, totals)
    echo(format_build(report, root, ids, total))
    return report


def format_build(r, root: Path, ids: list[int], total: int) -> str:
    t, secs = r.totals, max(r.seconds, 1e-9)
    who = f"builder {ids[0]}" if len(ids) == 1 else f"builders {ids[0]}-{ids[-1]}"
    lines = [
        f"cache {root}: {who} of {total} built {len(r.built)} of its {r.mine} partitions ({r.total} in all) in {r.seconds:.2f} s",
        f"  built here: {t.get('data/documents', 0):,} documents, {t.get('data/tokens', 0):,} tokens; "
        f"{t.get('data/documents', 0) / secs:,.1f} docs/s, {t.get('data/tokens', 0) / secs:,.0f} tokens/s",
        f"  dropped: {_group(t, 'dropped')}",
        f"  repaired: {_group(t, 'repaired')}",
        f"  skipped: {_group(t, 'skipped')}",
    ]
    if r.complete:
        lines.append(f"complete: train from it with data.sources: [{{path: {root}, format: packed}}]")
    else:
        lines.append(f"not complete yet: {r.done} of {r.total} partitions are built; the other builders finish it, or run this again to resume")
    return "\n".join(lines)
