"""Eval quality of each device mesh against the one-process run, in bf16, on real text (issue 22).

bf16 numerics differ per layout (FSDP2 computes in bf16 parameters with fp32 reductions, TP sums each row-parallel
matmul's halves in bf16 in another order, Ulysses attends per head group), so equality is the fp32 claim
(tests/test_mesh.py) and quality is the bf16 one: every mesh trains the same causal LM on the same stream (the
Python docs, 40 held-out documents) for the same steps and global batch, and its held-out loss is compared with the
one-process run's. Each arm is a real `shardtune launch` (accelerate -> torchrun; gloo on CPU, NCCL with --gpus).
The held-out documents are evaluated whole (no train.eval_batches: it caps batches per process, so a capped eval
would cover more documents on more ranks).

    .venv/bin/python bench/mesh_quality.py                            # tiny Llama from scratch, 4 CPU processes
    .venv/bin/python bench/mesh_quality.py --model smollm2-135m --gpus 4 --steps 200    # the real model, on GPUs

Prints one table: mesh, final held-out loss, its ratio to the one-process run's, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
# name -> (processes, launch flags, per-process micro-batch, DataLoader workers): the stream's slots (data ranks x
# workers) are 4 in every arm, and the global batch is 8 rows
MESHES = {
    "one process": (1, [], 8, 4),
    "dp_shard 4": (4, [], 2, 0),
    "HSDP 2 x 2": (4, ["--dp-replicate", "2", "--dp-shard", "2"], 2, 0),
    "FSDP2 x TP 2 x 2": (4, ["--tp", "2"], 4, 2),
    "TP 2": (2, ["--tp", "2"], 8, 4),
    "dp 2 x sp 2": (4, ["--sp", "2"], 4, 2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (a Llama from scratch, a 2k-token BPE of the docs) or a model to continue pretraining")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=("bf16", "no"))
    p.add_argument("--gpus", type=int, default=0, help="GPUs (0 = CPU processes); a 4-process arm needs 4")
    p.add_argument("--meshes", default=",".join(MESHES), help="comma-separated names of MESHES")
    return p.parse_args(argv)


def docs_tokenizer(work: Path, vocab: int = 2048) -> Path:
    """A byte-level BPE of `vocab` tokens trained on the Python docs themselves (seconds): the tiny model's vocabulary.
    SmolLM2's 49k-token head would be most of a tiny model's step, and on a CPU without native bf16 it is emulated."""
    import glob

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(DOCS, recursive=True))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = work / "docs-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def overrides(a, out: Path, batch: int, workers: int) -> list[str]:
    model = (["model.init=scratch", "model.preset=tiny", f"model.name_or_path={a.tokenizer}", "optim.lr=3e-3"] if a.model == "tiny"
             else [f"model.name_or_path={a.model}", "optim.lr=1e-4"])
    return [*model, f"data.sources=[{{path: '{DOCS}', txt_unit: file}}]", "data.holdout=40", f"data.seq_len={a.seq_len}",
            f"data.num_workers={workers}", f"train.batch_size={batch}", f"train.max_steps={a.steps}", "train.log_every=10",
            f"train.mixed_precision={a.precision}", "train.eval_batch_size=32", "optim.weight_decay=0.1",
            "optim.warmup_steps=10", "model.dropout=0", "tracking.report_to=[]", f"output.dir={out}"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(a, name: str, work: Path) -> dict:
    processes, flags, batch, workers = MESHES[name]
    out = work / name.replace(" ", "_")
    cfg = work / "lm.yaml"
    cfg.write_text("task: causal_lm\n")
    cmd = [sys.executable, "-m", "shardtune.cli", "launch", str(cfg), "--strategy", "fsdp", *flags,
           *(["--gpus", str(processes)] if a.gpus else ["--gpus", "0", "--processes", str(processes)]),
           "--main-port", str(free_port()), *overrides(a, out, batch, workers)]
    if processes == 1:
        cmd = [sys.executable, "-m", "shardtune.cli", "train", str(cfg), "dist.strategy=fsdp", *overrides(a, out, batch, workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:100], "wall": wall}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"name": name, "eval_loss": metrics["best/eval/loss"], "wall": wall}


def main(argv=None) -> int:
    a = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mesh-quality-") as tmp:
        a.tokenizer = docs_tokenizer(Path(tmp)) if a.model == "tiny" else None
        for name in a.meshes.split(","):
            rows.append(run_arm(a, name, Path(tmp)))
            print(f"{name}: {rows[-1]}", flush=True)
    base = next((r["eval_loss"] for r in rows if r["name"] == "one process" and "eval_loss" in r), None)
    print(f"\n{a.model}, {a.precision}, {a.steps} steps of 8 x {a.seq_len} tokens, Python docs (40 held-out documents)")
    print("| mesh | held-out loss | ratio to one process | wall s |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} | - | {r['wall']:.0f} |")
        else:
            ratio = f"{r['eval_loss'] / base:.4f}" if base else "-"
            print(f"| {r['name']} | {r['eval_loss']:.4f} | {ratio} | {r['wall']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
