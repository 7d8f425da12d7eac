"""Data pipeline: the streaming stage on a real corpus against plain `datasets` baselines.

Corpus: the Python 3.11 documentation sources of the Debian package
python3.11-doc (`/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`, 497
files, 11 MB), one document per file, in sorted path order. Tokenizer: the
packaged SmolLM2-135M one (`shardtune.assets.packaged_model("smollm2-135m")`,
converted once from the packaged GGUF). One process, one run:

(a) throughput, tokens of text per second:
      stream    `StreamLoader(num_workers=0, batch_size=8)` over the files:
                read, clean (NFC, control characters), tokenize (64 documents
                per call), pack into rows of seq_len with EOS separators,
                collate into LongTensor batches
      baseline  `datasets.Dataset.from_dict({"text": docs}).map(tokenize,
                batched=True)` over the same texts already in memory:
                tokenize only, nothing read, cleaned, packed or collated
    Arms alternate for --rounds rounds; the table gives medians of wall-clock
    and of this process's CPU time (time.process_time), which is less
    sensitive to other jobs on a shared machine. Both arms tokenize
    single-threaded (TOKENIZERS_PARALLELISM=false) with the same tokenizer.
    Tokens counted: the tokenizer's tokens of the texts (the stream's EOS
    separators are not counted, so both arms count the same work).

(b) packing efficiency (non-pad fraction of the model's input tokens) of the
    stream's rows against pad-to-longest batching of the same documents:
    each document truncated at seq_len, batches of --batch in corpus order,
    padded to the longest in the batch (token lists from the baseline arm).
    Also the fraction of the corpus' tokens that reach the model at all.

(c) data wait: a tiny LlamaForCausalLM (hidden 64, 2 layers, 4 heads, the
    SmolLM2 vocabulary, tied embeddings) trained with AdamW on StreamLoader
    batches (--train-seq-len, --batch) with 2 DataLoader workers; per step,
    the time blocked in next(iterator) and the whole step (next + forward +
    backward + optimizer step + zero_grad), summed over --steps steps after
    --warmup steps (the warmup holds the workers' start-up and first batch).
    For reference, the same loader under a fixed --fast-step-ms step (a sleep
    instead of the model, as a fast accelerator step would be) shows where
    the wait starts to matter: each next() costs ~1-2 ms of DataLoader
    inter-process transfer even when the batch is ready.

Threads: torch.set_num_threads(--threads), default 1, for (c): on a 2-core
machine this leaves a core to the two workers (DataLoader workers use one
thread each) and avoids the oversubscription bench/step_overhead.py measured.

Run: .venv/bin/python bench/data_pipeline.py   (about 2-4 minutes on a busy 2-core CPU)
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import subprocess
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # both arms single-threaded, set before tokenizers loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PYDOCS = "/usr/share/doc/python3.11/html/_sources"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=512, help="row length for (a) and (b)")
    p.add_argument("--batch", type=int, default=8, help="batch size (rows) everywhere")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two (a) arms")
    p.add_argument("--train-seq-len", type=int, default=256, help="row length for (c)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps in (c)")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps before them")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process in (c)")
    p.add_argument("--fast-step-ms", type=float, default=30, help="the reference step of (c) without a model; 0 = skip")
    p.add_argument("--fast-steps", type=int, default=200, help="timed steps of that reference")
    return p.parse_args()


def stream_config(seq_len: int):
    from shardtune.config import StreamConfig

    return StreamConfig.model_validate({"sources": [{"path": f"{PYDOCS}/**/*.rst.txt", "txt_unit": "file"}], "seq_len": seq_len})


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# ---------------------------------------------------------------- (a) throughput


def arm_stream(tok, seq_len: int, batch: int) -> dict:
    from shardtune.data.stream import StreamLoader

    w0, c0 = clocks()
    loader = StreamLoader(stream_config(seq_len), tok, num_workers=0, batch_size=batch)
    for _ in loader:
        pass
    w1, c1 = clocks()
    s = loader.stats()
    text_tokens = s["data/tokens"] - s["data/documents"]  # minus one EOS per document (no splitting: no max_chars)
    return {"wall": w1 - w0, "cpu": c1 - c0, "tokens": text_tokens, "stats": s}


def arm_datasets(tok, docs: list[str]) -> dict:
    import datasets

    w0, c0 = clocks()
    ds = datasets.Dataset.from_dict({"text": docs}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    w1, c1 = clocks()
    lengths = [len(ids) for ids in ds["input_ids"]]
    return {"wall": w1 - w0, "cpu": c1 - c0, "tokens": sum(lengths), "lengths": lengths}


def throughput(tok, docs: list[str], args) -> tuple[list[dict], list[dict]]:
    streams, maps = [], []
    for r in range(args.rounds):
        order = ("stream", "datasets") if r % 2 == 0 else ("datasets", "stream")
        for arm in order:
            if arm == "stream":
                streams.append(arm_stream(tok, args.seq_len, args.batch))
            else:
                maps.append(arm_datasets(tok, docs))
            last = streams[-1] if arm == "stream" else maps[-1]
            print(f"  (a) round {r + 1} {arm:8s}: {last['tokens']:,} tokens in {last['wall']:.1f} s wall, {last['cpu']:.1f} s CPU", flush=True)
    return streams, maps


# ---------------------------------------------------------------- (b) packing


def pad_to_longest(lengths: list[int], seq_len: int, batch: int) -> tuple[float, float]:
    """-> (non-pad fraction of the padded batches, fraction of the corpus' tokens kept after truncation)."""
    kept = [min(n, seq_len) for n in lengths]
    padded = sum(len(kept[i : i + batch]) * max(kept[i : i + batch]) for i in range(0, len(kept), batch))
    return sum(kept) / padded, sum(kept) / sum(lengths)


# ---------------------------------------------------------------- (c) data wait


def timed_steps(tok, args, step, steps: int) -> dict:
    """Blocked time in next() and whole-step time over `steps` steps after args.warmup, 2 workers."""
    from shardtune.data.stream import StreamLoader

    it = iter(StreamLoader(stream_config(args.train_seq_len), tok, num_workers=2, batch_size=args.batch))
    waits, totals = [], []
    for _ in range(args.warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        step(batch)
        waits.append(t1 - t0)
        totals.append(time.perf_counter() - t0)
    w, s = waits[args.warmup :], totals[args.warmup :]
    return {"wait": sum(w), "total": sum(s), "frac": sum(w) / sum(s), "step_ms": 1e3 * statistics.median(s),
            "median_wait_ms": 1e3 * statistics.median(w), "max_wait_ms": 1e3 * max(w), "first_wait_s": waits[0]}


def data_wait(tok, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=args.train_seq_len, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def train_step(batch):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = timed_steps(tok, args, train_step, args.steps)
    return {**out, "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------- report


def machine() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} CPUs ({name}), load average {os.getloadavg()[0]:.1f}"


def versions() -> str:
    import datasets
    import tokenizers
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}, datasets {datasets.__version__}")


def main() -> None:
    args = parse_args()
    files = sorted(glob.glob(f"{PYDOCS}/**/*.rst.txt", recursive=True))
    if not files:
        raise SystemExit(f"{PYDOCS} has no .rst.txt files: install the Debian package python3.11-doc (`make setup` as root).")
    import datasets
    from transformers import AutoTokenizer

    from shardtune.assets import packaged_model

    datasets.disable_progress_bars()
    start = time.perf_counter()
    print(f"machine: {machine()}\nversions: {versions()}", flush=True)
    tok = AutoTokenizer.from_pretrained(packaged_model("smollm2-135m"))
    docs = [open(f, encoding="utf-8").read() for f in files]
    print(f"corpus: {len(docs)} files, {sum(map(len, docs)) / 1e6:.1f} M characters; tokenizer SmolLM2-135M ({len(tok)} ids)", flush=True)

    streams, maps = throughput(tok, docs, args)
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    tps = {name: (med(runs, "tokens") / med(runs, "wall"), med(runs, "tokens") / med(runs, "cpu")) for name, runs in (("stream", streams), ("datasets", maps))}
    stats = streams[-1]["stats"]
    pad_eff, pad_kept = pad_to_longest(maps[-1]["lengths"], args.seq_len, args.batch)
    print(f"  (c) training {args.warmup}+{args.steps} steps ...", flush=True)
    wait = data_wait(tok, args)
    fast = None
    if args.fast_step_ms > 0:
        print(f"  (c) reference: {args.warmup}+{args.fast_steps} steps of {args.fast_step_ms:.0f} ms ...", flush=True)
        fast = timed_steps(tok, args, lambda batch: time.sleep(args.fast_step_ms / 1e3), args.fast_steps)
    lo = os.getloadavg()[0]

    ratio_w, ratio_c = tps["stream"][0] / tps["datasets"][0], tps["stream"][1] / tps["datasets"][1]
    print()
    print("| measure | shardtune stream | baseline | ratio / value | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| (a) tokens/s, wall (median of {args.rounds}) | {tps['stream'][0]:,.0f} | {tps['datasets'][0]:,.0f} (datasets.map, tokenize only) | {ratio_w:.2f}x | >= 0.9x |")
    print(f"| (a) tokens/CPU-s (median of {args.rounds}) | {tps['stream'][1]:,.0f} | {tps['datasets'][1]:,.0f} | {ratio_c:.2f}x | >= 0.9x |")
    print(f"| (b) non-pad fraction, seq_len {args.seq_len}, batch {args.batch} | {stats['data/packing_efficiency']:.2%} | {pad_eff:.2%} (pad to longest, truncate) | | >= 99% |")
    print(f"| (b) corpus tokens that reach the model | 100.00% | {pad_kept:.2%} | | |")
    print(f"| (c) time blocked on data / step time, 2 workers, tiny Llama | {wait['frac']:.2%} | | | < 5% |")
    if fast:
        print(f"| (c) the same with a {args.fast_step_ms:.0f} ms step (sleep, no model), for reference | {fast['frac']:.2%} | | | |")
    print()
    print(f"(a) {streams[-1]['tokens']:,} text tokens, {stats['data/documents']} documents, {stats['data/sequences']:,} rows; "
          f"stream wall {[round(r['wall'], 1) for r in streams]} s, datasets wall {[round(r['wall'], 1) for r in maps]} s")
    print(f"(c) {wait['params'] / 1e6:.2f}M-parameter Llama, seq_len {args.train_seq_len}, batch {args.batch}, {args.threads} torch thread(s): "
          f"median step {wait['step_ms']:.0f} ms, blocked {wait['wait']:.2f} s of {wait['total']:.1f} s, median/longest wait "
          f"{wait['median_wait_ms']:.1f}/{wait['max_wait_ms']:.0f} ms, first batch (workers starting, in warmup) {wait['first_wait_s']:.2f} s")
    if fast:
        print(f"(c) reference: median/longest wait {fast['median_wait_ms']:.1f}/{fast['max_wait_ms']:.0f} ms per {fast['step_ms']:.0f} ms step, "
              f"first batch {fast['first_wait_s']:.2f} s")
    print(f"load average at the end {lo:.1f}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
