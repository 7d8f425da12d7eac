"""What a step costs: throughput, MFU, the step-time breakdown, memory, and the run's environment.

Phases are timed without making the host wait on the GPU: CUDA events are
recorded at phase boundaries and read once per log window. Waiting for data
is host time spent in `next()` on the loader.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from shardtune.flops import model_flops_per_token, peak_flops

GIB = 1024**3


class Stopwatch:
    """now() marks a moment (a CUDA event on GPU); add() books an interval to a phase; totals() reads them in seconds."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.intervals: list[tuple[str, object, object]] = []

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, phase: str, start, end) -> None:
        self.intervals.append((phase, start, end))

    def totals(self) -> dict[str, float]:
        if self.cuda and self.intervals:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for phase, a, b in self.intervals:
            out[phase] = out.get(phase, 0.0) + (a.elapsed_time(b) / 1000 if self.cuda else b - a)
        self.intervals = []
        return out


@dataclass
class Window:
    """Sums over the optimizer steps since the last log line."""

    loss: torch.Tensor | float = 0.0  # tensors, so the hot path never waits on the device
    micro_batches: int = 0
    steps: int = 0
    samples: int = 0
    tokens: torch.Tensor | int = 0
    data_s: float = 0.0  # host time blocked on the data loader
    start: float = field(default_factory=time.perf_counter)
    counted: tuple[int, int] = (0, 0)  # global samples, tokens of this window already in the run's counters

    def add(self, loss: torch.Tensor, batch: dict) -> None:
        self.loss = self.loss + loss.detach().float()
        self.micro_batches += 1
        self.samples += batch["input_ids"].shape[0]
        mask = batch.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else batch["input_ids"].numel())


def _count(w: Window, run, samples: float, tokens: float) -> None:
    """Move the window's global samples/tokens not yet counted into the run's counters."""
    run.samples += int(samples) - w.counted[0]
    run.tokens += int(tokens) - w.counted[1]
    w.counted = (int(samples), int(tokens))


class Throughput:
    """Turns a window into the logged throughput, MFU, timing and memory metrics."""

    def __init__(self, acc, model, seq_len: int, mixed_precision: str):
        self.acc = acc
        cuda = acc.device.type == "cuda"
        self.clock = Stopwatch(cuda)
        self.flops_per_token = model_flops_per_token(acc.unwrap_model(model), seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(acc.device) if cuda else None, mixed_precision)

    def settle(self, w: Window, run) -> None:
        """Add the window's samples and tokens so far to the run's counters: a checkpoint between log steps must
        carry them. Collective."""
        sums = torch.tensor([w.samples, float(w.tokens)], dtype=torch.float64, device=self.acc.device)
        _count(w, run, *self.acc.reduce(sums, reduction="sum").tolist())

    def metrics(self, w: Window, lr: float, grad_norm, run) -> dict[str, float]:
        elapsed = time.perf_counter() - w.start
        phases = self.clock.totals()
        sums = torch.tensor([float(w.loss), w.micro_batches, w.samples, float(w.tokens)], dtype=torch.float64, device=self.acc.device)
        loss, micro, samples, tokens = self.acc.reduce(sums, reduction="sum").tolist()
        _count(w, run, samples, tokens)
        steps = max(w.steps, 1)
        per_device = tokens / elapsed / self.acc.num_processes
        out = {
            "train/loss": loss / max(micro, 1),
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/samples_per_s": samples / elapsed,
            "train/tokens_per_s": tokens / elapsed,
            "train/tokens_per_s_per_device": per_device,
            "train/samples": run.samples,
            "train/tokens": run.tokens,
            "train/data_wait_fraction": min(w.data_s / elapsed, 1.0),
            "time/step_s": elapsed / steps,
            "time/data_s": w.data_s / steps,
            "time/forward_backward_s": phases.get("forward_backward", 0.0) / steps,
            "time/optimizer_s": phases.get("optimizer", 0.0) / steps,
            **memory(self.acc),
        }
        if self.peak:
            out["train/mfu"] = per_device * self.flops_per_token / self.peak
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            out["train/loss_scale"] = float(scaler.get_scale())
        return out


def memory(acc) -> dict[str, float]:
    """Peak memory of this process: GPU allocated/reserved, or host RSS on CPU."""
    if acc.device.type == "cuda":
        return {
            "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(acc.device) / GIB,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(acc.device) / GIB,
        }
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def _git_sha() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(acc) -> dict:
    """The run's code, packages and hardware, for the W&B config."""
    versions = {}
    for pkg in ("shardtune", "torch", "transformers", "accelerate", "deepspeed", "datasets", "peft", "wandb"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "git_sha": _git_sha(),
        "versions": versions,
        "hardware": {"cpu": platform.processor() or platform.machine(), "gpus": gpus, "num_processes": acc.num_processes},
    }
