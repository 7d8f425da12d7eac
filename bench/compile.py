"""torch.compile on vs off, per task, on this CPU: time per training step after warm-up, and whether it computes the same.

Tasks (dropout off, so that compiled and eager runs compute the same function):

  classification  the quickstart step: packaged MiniLM-L6 as a 2-label classifier, batches of 32 packaged
                  Rotten Tomatoes snippets at max_length 64, padded per batch to a multiple of 8 (so the
                  sequence length varies: compiled with dynamic shapes)
  causal_lm       a tiny Llama (`models.PRESETS["tiny"]`: hidden 64, 2 layers) with SmolLM2's 49,152-word
                  vocabulary, 8 x 256 tokens of the Python docs per step (a fixed shape)

Modes: eager; `regional` (each transformer layer compiled with `layer.compile()`: one graph reused by every
layer, so compile time does not grow with depth -- the form to use on CPU); `full` (`torch.compile(model)`,
whole forward; on this machine the MiniLM forward + backward took about 3 minutes to compile per shape, so it
is off by default). A step is forward + backward + fused AdamW.

Each mode's model starts from the same weights; the first step's loss and gradients are compared with eager's
(max |difference| relative to the largest eager gradient). Then `--warmup` steps (compilation included,
reported as "warm-up s"), then `--steps` timed steps interleaved across modes step by step (a shared machine
slows all modes alike); medians of wall time and of this process's CPU time per step.

Run: .venv/bin/python bench/compile.py   (about 3-5 minutes on the 2-core CPU)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, median, quickstart_batches  # noqa: E402

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="classification,causal_lm")
    p.add_argument("--modes", default="eager,regional", help="eager,regional,full")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    return p.parse_args()


def classification(n: int):
    """(model, layers, batches, dynamic)."""
    from transformers import AutoModelForSequenceClassification

    from shardtune.assets import packaged_model

    _, batches = quickstart_batches(n, 32)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        packaged_model("minilm-l6"), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return model, model.bert.encoder.layer, batches, True


def causal_lm(n: int):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shardtune.assets import packaged_model
    from shardtune.models import PRESETS

    tok = AutoTokenizer.from_pretrained(packaged_model("smollm2-135m"))
    docs = sorted(Path("/usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt"))
    ids: list[int] = []
    for path in docs:
        ids += tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * 8 * 256:
            break
    rows = torch.tensor(ids[: n * 8 * 256]).view(n, 8, 256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, **PRESETS["tiny"]))
    return model, model.model.layers, [{"input_ids": r, "labels": r} for r in rows], False


class Mode:
    def __init__(self, name: str, base, layers_of, dynamic: bool):
        self.name = name
        self.model = copy.deepcopy(base).train()
        if name == "regional":
            for layer in layers_of(self.model):
                layer.compile(dynamic=dynamic)
        self.call = torch.compile(self.model, dynamic=dynamic) if name == "full" else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=True)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.warmup_s = 0.0
        self.check = (0.0, 0.0)  # (first-loss rel diff, max grad diff / max grad) against eager

    def step(self, batch: dict, timed: bool = True) -> float:
        w, c = time.perf_counter(), time.process_time()
        loss = self.call(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if timed:
            self.wall.append(time.perf_counter() - w)
            self.cpu.append(time.process_time() - c)
        return loss.item()

    def first(self, batch: dict) -> tuple[float, dict]:
        """Loss and gradients of the first batch, before any update."""
        loss = self.call(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.opt.zero_grad(set_to_none=True)
        return loss.item(), grads


def run_task(task: str, a) -> list[str]:
    build = {"classification": classification, "causal_lm": causal_lm}[task]
    base, layers, batches, dynamic = build(1 + a.warmup + a.steps)
    layers_of = (lambda m: m.bert.encoder.layer) if task == "classification" else (lambda m: m.model.layers)
    modes = [Mode(name, base, layers_of, dynamic) for name in a.modes.split(",")]
    ref_loss, ref_grads = None, None
    rows = []
    for mode in modes:
        start = time.perf_counter()
        loss, grads = mode.first(batches[0])
        for b in batches[1 : 1 + a.warmup]:
            mode.step(b, timed=False)
        mode.warmup_s = time.perf_counter() - start
        if ref_loss is None:
            ref_loss, ref_grads = loss, grads
        scale = max(g.abs().max().item() for g in ref_grads.values())
        diff = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()) / scale
        mode.check = (abs(loss - ref_loss) / abs(ref_loss), diff)
        print(f"{task} {mode.name}: warm-up {mode.warmup_s:.1f} s, first loss {loss:.6f}", file=sys.stderr, flush=True)
    for b in batches[1 + a.warmup :]:
        for mode in modes:
            mode.step(b)
    eager = modes[0]
    for mode in modes:
        rows.append(
            f"| {task} | {mode.name} | {mode.warmup_s:.1f} | {median(mode.wall) * 1e3:.0f} | {median(eager.wall) / median(mode.wall):.2f}x | "
            f"{median(mode.cpu) * 1e3:.0f} | {median(eager.cpu) / median(mode.cpu):.2f}x | {mode.check[0]:.1e} | {mode.check[1]:.1e} |"
        )
    return rows


def main() -> int:
    a = parse_args()
    torch.set_num_threads(a.threads)
    load = [os.getloadavg()[0]]
    print(f"machine: {cpu_model()}, torch {torch.__version__}, threads {a.threads}")
    rows = []
    for task in a.tasks.split(","):
        rows += run_task(task, a)
    load.append(os.getloadavg()[0])
    print(f"\ntorch.compile vs eager: {a.warmup} warm-up + {a.steps} timed steps per mode, medians; load {load[0]:.1f} -> {load[1]:.1f}")
    print("| task | mode | warm-up s (incl. compile) | step ms | speed-up | CPU ms/step | speed-up (CPU) | first loss rel diff | max grad diff / max grad |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
