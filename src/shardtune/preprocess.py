"""`shardtune preprocess`: what the streaming stage makes of a causal_lm config, and a cache of it.

    shardtune preprocess CONFIG [KEY=VALUE ...] --show N [--write DIR]

One pass of a `StreamLoader` (one process, no workers) over the configured
split: the first N packed rows are printed decoded, each document marked; then
the stage's rates and counts over the rows streamed (--max-rows, default the
first STATS_ROWS rows, or all rows with --write). With --write the packed rows are also cached as
shards under DIR, to be read back with `load_cached(DIR)`:

    DIR/manifest.json             format, stream fingerprint, packing options,
                                  tokenizer, the stream config, rows per shard,
                                  stats, and the stream state after the last row
    DIR/00000.<key>.npy ...       one array [rows, seq_len] per batch key and
                                  shard (int32; attention_mask int8), memory-mapped
                                  on read

`load_cached` checks (when given the run's stream config and tokenizer) that
the cache was written with the same data settings; its rows are the
StreamLoader's rows, in order, with the same keys, so `PackedCache.batches(B)`
equals iterating a one-process StreamLoader with batch_size B.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from shardtune import ShardtuneError
from shardtune.config import DEFAULT_MODELS, LM_TASKS, Config, StreamConfig

CACHE_FORMAT = "shardtune.packed/1"
MANIFEST = "manifest.json"
SHARD_ROWS = 1024
STATS_ROWS = 1000  # rows streamed for the stats when not writing (a few rows would time mostly start-up)
DTYPES = {"attention_mask": np.int8}  # every other key: int32
PACKING_KEYS = ("seq_len", "split_documents", "doc_positions")


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


# ---------------------------------------------------------------- one pass


@dataclass
class Pass:
    """The outcome of one preprocessing pass."""

    rows: int = 0
    seconds: float = 0.0  # time inside the stream (reading, cleaning, tokenizing, packing, collating)
    stats: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # the first rows: {"input_ids", "doc_ids"} without padding


def preprocess(cfg: Config, *, show: int = 3, write: Optional[Path] = None, split: str = "train",
               max_rows: Optional[int] = None, shard_rows: int = SHARD_ROWS,
               echo: Callable[[str], None] = print) -> Pass:
    """Stream `split` once: echo the first `show` rows decoded, then the stats; with `write`, cache every row."""
    from shardtune.data.partitions import source_files
    from shardtune.data.stream import StreamLoader

    scfg = stream_config(cfg)
    if show < 0 or (max_rows is not None and max_rows < 1):
        raise ShardtuneError("--show must be >= 0 and --max-rows >= 1.")
    if write is None and show == 0:
        raise ShardtuneError("nothing to do: pass --show N to see rows and/or --write DIR to cache them.")
    if write is not None and write.exists() and (not write.is_dir() or any(write.iterdir())):
        raise ShardtuneError(f"--write {write} already exists and is not an empty folder; remove it or choose another folder.")
    source_files(scfg.sources + scfg.validation_sources, scfg.sft is not None)  # fail on a bad source before loading a tokenizer
    tokenizer = load_tokenizer(cfg)
    limit = max_rows if max_rows is not None else (None if write is not None else max(show, STATS_ROWS))
    # one row per batch when cutting at a row count, so the saved stream state is exactly after the last row
    batch_size = 1 if limit is not None else min(64, shard_rows)
    loader = StreamLoader(scfg.model_copy(update={"emit_doc_ids": True}), tokenizer, split=split, batch_size=batch_size)
    if limit is None and loader.endless:
        raise ShardtuneError("this stream repeats its sources without end (on_source_end: repeat); set data.max_documents or pass --max-rows to --write.")
    writer = ShardWriter(write, shard_rows) if write is not None else None
    try:
        result = _stream(loader, limit, show, writer, echo)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    echo(format_stats(result, scfg.seq_len))
    if writer is not None:
        manifest = _manifest(cfg, scfg, loader, tokenizer, split, result)
        writer.finish(manifest)
        echo(f"wrote {result.rows} rows in {len(writer.shards)} shard(s) to {write}; read them with shardtune.preprocess.load_cached({str(write)!r})")
    return result


def _stream(loader, limit: Optional[int], show: int, writer: Optional["ShardWriter"], echo: Callable[[str], None]) -> Pass:
    result = Pass()
    for batch in _timed_rows(loader, limit, result):
        for i in range(len(batch["input_ids"])):
            if len(result.samples) < show:
                keep = batch["doc_ids"][i] >= 0
                sample = {"input_ids": batch["input_ids"][i][keep].tolist(), "doc_ids": batch["doc_ids"][i][keep].tolist()}
                prev_last = result.samples[-1]["doc_ids"][-1] if result.samples and result.samples[-1]["doc_ids"] else None
                echo(format_sample(len(result.samples), sample, prev_last, loader.tokenizer, loader.opt.eos_id))
                result.samples.append(sample)
        if writer is not None:
            writer.add({k: v.numpy() for k, v in batch.items()})
    result.stats = loader.stats()
    return result


def _timed_rows(loader, limit: Optional[int], result: Pass) -> Iterator[dict]:
    """The loader's batches, cut at `limit` rows; the time spent producing them goes into result.seconds."""
    while limit is None or result.rows < limit:
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


# ---------------------------------------------------------------- the cache


def _manifest(cfg: Config, scfg: StreamConfig, loader, tokenizer, split: str, result: Pass) -> dict:
    return {
        "format": CACHE_FORMAT,
        "fingerprint": _fingerprint(loader.settings),
        "split": split,
        "packing": {k: getattr(scfg, k) for k in PACKING_KEYS} | {"eos_id": loader.opt.eos_id, "pad_id": loader.opt.pad_id},
        "tokenizer": {"name_or_path": cfg.model.name_or_path, "vocab_size": len(tokenizer)},
        "emit_doc_ids": scfg.emit_doc_ids,
        "stream": scfg.model_dump(mode="json"),
        "rows": result.rows,
        "stats": result.stats,
        "stream_state": loader.state_dict(),  # where a run continues streaming after the cached rows
    }


def _fingerprint(settings: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class ShardWriter:
    """Rows into fixed-size shards of .npy arrays in a temporary sibling folder, renamed into place at the end."""

    def __init__(self, root: Path, shard_rows: int):
        self.root, self.shard_rows = Path(root), shard_rows
        self.tmp = self.root.parent / f".{self.root.name}.tmp{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.buf: dict[str, list[np.ndarray]] = {}
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for key, arr in batch.items():
            self.buf.setdefault(key, []).append(arr.astype(DTYPES.get(key, np.int32)))
        self.buffered += len(next(iter(batch.values())))
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        name = f"{len(self.shards):05d}"
        rest = {}
        for key, parts in self.buf.items():
            arr = np.concatenate(parts)
            np.save(self.tmp / f"{name}.{key}.npy", arr[:n])
            rest[key] = [arr[n:]]
        self.buf, self.buffered = rest, self.buffered - n
        self.shards.append({"name": name, "rows": n})

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, manifest: dict) -> None:
        if self.buffered:
            self._flush(self.buffered)
        manifest = {**manifest, "keys": sorted(self.buf), "shards": self.shards}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if self.root.is_dir():
            self.root.rmdir()  # checked empty before the pass
        os.rename(self.tmp, self.root)


class PackedCache:
    """Rows written by `shardtune preprocess --write`; a map-style dataset (use with a torch DataLoader)."""

    def __init__(self, root: Path, manifest: dict, emit_doc_ids: Optional[bool] = None):
        self.root, self.manifest = Path(root), manifest
        self.seq_len = manifest["packing"]["seq_len"]
        doc_ids = manifest["emit_doc_ids"] if emit_doc_ids is None else emit_doc_ids
        self.keys = [k for k in manifest["keys"] if k != "doc_ids" or doc_ids]
        self.starts = np.cumsum([0] + [s["rows"] for s in manifest["shards"]])
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # DataLoader workers map the files themselves

    def _array(self, shard: int, key: str) -> np.ndarray:
        arr = self._arrays.get((shard, key))
        if arr is None:
            arr = np.load(self.root / f"{self.manifest['shards'][shard]['name']}.{key}.npy", mmap_mode="r")
            self._arrays[(shard, key)] = arr
        return arr

    def rows(self, start: int, stop: int) -> dict:
        """Rows [start, stop) as a batch: dict of LongTensor [stop - start, seq_len]."""
        import torch

        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for shard in range(first, len(self.starts) - 1):
            lo, hi = self.starts[shard], self.starts[shard + 1]
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            for k in self.keys:
                parts[k].append(self._array(shard, k)[a:b])
        return {k: torch.from_numpy(np.concatenate(v).astype(np.int64)) for k, v in parts.items()}

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return {k: v[0] for k, v in self.rows(i, i + 1).items()}

    def batches(self, batch_size: int) -> Iterator[dict]:
        """Consecutive batches in stream order (the last one may be short), like a one-process StreamLoader."""
        for start in range(0, len(self), batch_size):
            yield self.rows(start, min(start + batch_size, len(self)))


def load_cached(root: str | Path, cfg: Optional[StreamConfig] = None, tokenizer=None, split: str = "train") -> PackedCache:
    """Open a cache written by `shardtune preprocess --write`; with cfg and tokenizer, check it fits that run."""
    from shardtune.data.plan import stream_settings
    from shardtune.data.stream import special_ids

    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        raise ShardtuneError(f"{root} holds no readable {MANIFEST}; write the cache with `shardtune preprocess CONFIG --write {root}`.") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise ShardtuneError(f"{root} holds a cache of format {manifest.get('format')!r}, not {CACHE_FORMAT}; rewrite it with this version's `shardtune preprocess --write`.")
    missing = [s["name"] for s in manifest["shards"] for k in manifest["keys"] if not (root / f"{s['name']}.{k}.npy").is_file()]
    if missing:
        raise ShardtuneError(f"the cache {root} is missing shard {missing[0]}; rewrite it with `shardtune preprocess --write`.")
    if cfg is not None and tokenizer is not None:
        eos, pad = special_ids(cfg, tokenizer)
        want = {k: getattr(cfg, k) for k in PACKING_KEYS} | {"eos_id": eos, "pad_id": pad}
        if manifest["fingerprint"] != _fingerprint(stream_settings(cfg, split, tokenizer)) or manifest["packing"] != want or manifest["split"] != split:
            raise ShardtuneError(
                f"the cache {root} was written with other data settings (sources, seed, clean, seq_len, packing or tokenizer) "
                f"than this run's {split} data; rewrite it with `shardtune preprocess CONFIG --write DIR` or drop the cache."
            )
    return PackedCache(root, manifest, cfg.emit_doc_ids if cfg is not None else None)
