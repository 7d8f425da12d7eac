"""A CPU roofline: this machine's measured dense matmul FLOP/s in fp32 and bf16, and the quickstart's training step
as a fraction of the peak of its dtype (the CPU counterpart of MFU).

1. Peaks: `shardtune.hardware.matmul_peak_flops` (square matmuls, sizes doubling from 256 while one product takes
   under budget / 8, best of the repeats within `--peak-budget` seconds) for fp32 and bf16, at `--threads`.
2. The quickstart step: the packaged MiniLM-L6 as a 2-label classifier, the first packaged Rotten Tomatoes
   snippets tokenized at max_length 64, batches of 32 padded to a multiple of 8 (the quickstart's collation),
   forward + backward + fused AdamW (lr 5e-5), fp32 and under bf16 autocast (`torch.autocast("cpu",
   torch.bfloat16)`, fp32 weights, as Accelerate's mixed_precision=bf16 does). Model FLOPs per step are
   `shardtune.flops.model_flops_per_token(model, T)` x B x T for each batch's padded shape B x T (the work the
   hardware does, padding included; the "useful" column counts only non-pad tokens). A second fp32 arm takes
   its batches from `shardtune.data.grouping.length_grouped_order` over all snippets (the first batches of
   epoch 0, seed 42) instead of the file order: less padding. Arms alternate over
   `--rounds`, each round `--warmup` untimed and `--steps` timed steps on the same batches; medians. Where bf16
   is native, a bf16 length-grouped arm is the quickstart's own step (its defaults: auto -> bf16, grouped batches).
3. Where the time goes: one step per arm under torch.profiler; the matmuls' share of the step and the FLOP/s they
   reach on their own shapes (FLOPs from the recorded input shapes over their own time), and dropout's share.

On a CPU without native bf16 (`hardware.native_bf16` says why) a bf16 step at batch 32 would take minutes, so
the bf16 arm runs at `--slow-batch` (default 2) with a matching fp32 arm at that batch, and fewer steps.

Run: .venv/bin/python bench/roofline.py   (about 2-4 minutes on the 2-core CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, median, minilm_classifier, quickstart_batches, timed  # noqa: E402

import torch  # noqa: E402

from shardtune.flops import model_flops_per_token  # noqa: E402
from shardtune.hardware import matmul_peak_flops, native_bf16  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peak-budget", type=float, default=3.0, help="seconds per dtype for the matmul peak")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--slow-batch", type=int, default=2, help="bf16 batch where bf16 is not native")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


class Arm:
    def __init__(self, name: str, dtype: torch.dtype, batches: list[dict], steps: int):
        self.name, self.dtype, self.batches, self.steps = name, dtype, batches, steps
        self.model = minilm_classifier()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=5e-5, fused=True)
        self.mean_len = sum(b["input_ids"].shape[1] for b in batches) / len(batches)
        self.times: list[float] = []
        self.rates: list[tuple[float, float]] = []
        self.flops = [b["input_ids"].numel() * model_flops_per_token(self.model, b["input_ids"].shape[1]) for b in batches]
        self.useful = [int(b["attention_mask"].sum()) * model_flops_per_token(self.model, b["input_ids"].shape[1]) for b in batches]

    def step(self, batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, warmup: int) -> None:
        for i in range(warmup + self.steps):
            j = i % len(self.batches)
            t = timed(lambda: self.step(self.batches[j]))
            if i >= warmup:
                self.times.append(t)
                self.rates.append((self.flops[j] / t, self.useful[j] / t))

    def flop_rate(self, useful: bool = False) -> float:
        """Median over timed steps of that step's model FLOPs / its time."""
        return median(r[useful] for r in self.rates)


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_flops(name: str, shapes: list) -> float:
    """2 M K N (times the batch for bmm) from the profiler's input shapes of one matmul call."""
    a, b = (shapes[1], shapes[2]) if name == "aten::addmm" else (shapes[0], shapes[1])
    return 2.0 * (a[0] if name == "aten::bmm" else 1) * a[-2] * a[-1] * b[-1]


def print_breakdown(arms: list, peaks: dict) -> None:
    """Where one step's time goes (torch.profiler, one step per arm on its first batch): the matmuls' share and
    the FLOP/s they reach by themselves (their FLOPs from the recorded shapes over their own time), and dropout's
    random-mask draws (aten::bernoulli_). Matmuls below the square-matmul peak bound the whole step below it."""
    from torch.profiler import ProfilerActivity, profile

    print("\nOne profiled step per arm: | arm | step ms (profiled) | matmul share | matmul GFLOP/s | matmul of the peak "
          "| dropout (bernoulli_) share |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm in arms:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            arm.step(arm.batches[0])
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in events)
        mm = [e for e in events if e.key in MATMULS]
        mm_us = sum(e.self_cpu_time_total for e in mm)
        mm_flops = sum(e.count * matmul_flops(e.key, e.input_shapes) for e in mm)
        drop_us = sum(e.self_cpu_time_total for e in events if e.key == "aten::bernoulli_")
        rate = mm_flops / (mm_us / 1e6)
        print(f"| {arm.name} | {total / 1e3:.0f} | {mm_us / total:.2f} | {rate / 1e9:.1f} | {rate / peaks[arm.dtype]:.2f} | "
              f"{drop_us / total:.2f} |")


def main() -> int:
    a = parse_args()
    torch.set_num_threads(a.threads)
    native, why = native_bf16("cpu")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {a.threads}; bf16 native: {native} ({why})")
    load = [os.getloadavg()[0]]
    peaks = {dt: matmul_peak_flops(dt, "cpu", budget_s=a.peak_budget) for dt in (torch.float32, torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks[torch.float32] / 1e9:.1f} GFLOP/s, bf16 {peaks[torch.bfloat16] / 1e9:.1f} GFLOP/s "
          f"(bf16/fp32 {peaks[torch.bfloat16] / peaks[torch.float32]:.2f}x)", flush=True)

    n_batches = a.warmup + a.steps
    _, big = quickstart_batches(n_batches, a.batch)
    _, grouped = quickstart_batches(n_batches, a.batch, grouped=True)
    arms = [Arm(f"fp32, batch {a.batch}", torch.float32, big, a.steps),
            Arm(f"fp32, batch {a.batch}, length-grouped", torch.float32, grouped, a.steps)]
    if native:
        arms.append(Arm(f"bf16 autocast, batch {a.batch}", torch.bfloat16, big, a.steps))
        arms.append(Arm(f"bf16 autocast, batch {a.batch}, length-grouped (the quickstart's step)", torch.bfloat16, grouped, a.steps))
    else:
        _, small = quickstart_batches(n_batches, a.slow_batch)
        slow_steps = max(1, a.steps // 3)
        arms.append(Arm(f"fp32, batch {a.slow_batch}", torch.float32, small, slow_steps))
        arms.append(Arm(f"bf16 autocast, batch {a.slow_batch}", torch.bfloat16, small, slow_steps))
    for r in range(a.rounds):
        for arm in arms[r % len(arms):] + arms[: r % len(arms)]:
            arm.run(a.warmup if r == 0 else 0)
            print(f"round {r + 1} {arm.name}: median step {median(arm.times) * 1e3:.0f} ms so far, load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])

    print(f"\nMiniLM-L6 training step (forward + backward + fused AdamW), max_length 64, padded to a multiple of 8; "
          f"load {load[0]:.1f} -> {load[1]:.1f}")
    print("| arm | mean padded length | median step ms | model GFLOP/s | peak of its dtype GFLOP/s | fraction of peak | "
          "useful (non-pad) GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arm in arms:
        rate, peak = arm.flop_rate(), peaks[arm.dtype]
        print(f"| {arm.name} | {arm.mean_len:.1f} | {median(arm.times) * 1e3:.0f} | {rate / 1e9:.1f} | {peak / 1e9:.1f} | {rate / peak:.2f} | "
              f"{arm.flop_rate(useful=True) / 1e9:.1f} |")
    print_breakdown(arms, peaks)
    if not native:
        f32, b16 = arms[-2], arms[-1]
        print(f"\nbf16 autocast vs fp32 at batch {a.slow_batch}: {median(b16.times) / median(f32.times):.1f}x the step time "
              "(bf16 is emulated here: `train.mixed_precision: auto` picks fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
