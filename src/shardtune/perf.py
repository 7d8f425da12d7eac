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
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from shardtune.flops import model_flops_per_token
from shardtune.hardware import mfu_peak

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
    """Sums over the optimizer steps since the last log line, kept on the device (the hot path never reads them)."""

    loss: torch.Tensor | float = 0.0  # sum of per-token (per-example) losses
    weight: torch.Tensor | float = 0.0  # what the loss is averaged over
    steps: int = 0
    samples: torch.Tensor | int = 0
    tokens: torch.Tensor | int = 0
    data_s: float = 0.0  # host time blocked on the data loader
    start: float = field(default_factory=time.perf_counter)
    counted: tuple[int, int] = (0, 0)  # global samples, tokens of this window already in the run's counters

    def add(self, loss_sum: torch.Tensor, sizes) -> None:
        self.loss = self.loss + loss_sum.detach().double()
        self.weight = self.weight + sizes.weight.double()
        self.samples = self.samples + sizes.samples
        self.tokens = self.tokens + sizes.tokens


def _count(w: Window, run, samples: float, tokens: float) -> None:
    """Move the window's global samples/tokens not yet counted into the run's counters."""
    run.samples += int(samples) - w.counted[0]
    run.tokens += int(tokens) - w.counted[1]
    w.counted = (int(samples), int(tokens))


def _sums(strategy, *values) -> list[float]:
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=strategy.device) for v in values])
    return strategy.data_sum(t).tolist()


class Throughput:
    """Turns a window into the logged throughput, MFU, timing and memory metrics."""

    def __init__(self, strategy, model, seq_len: int, mixed_precision: str):
        self.strategy = strategy
        cuda = strategy.device.type == "cuda"
        self.clock = Stopwatch(cuda)
        self.flops_per_token = model_flops_per_token(model, seq_len)
        # the GPU's datasheet peak, or this CPU's measured matmul peak in the step's dtype (hardware.py)
        self.peak, self.peak_source = mfu_peak(strategy.device, mixed_precision)
        self.mixed_precision = mixed_precision
        self.peak_checked = strategy.device.type != "cpu"  # a measured (CPU) peak is checked once against the run

    def settle(self, w: Window, run) -> None:
        """Add the window's samples and tokens so far to the run's counters: a checkpoint between log steps must
        carry them. Collective."""
        _count(w, run, *_sums(self.strategy, w.samples, w.tokens))

    def metrics(self, w: Window, lr: float, grad_norm: float, run) -> dict[str, float]:
        elapsed = time.perf_counter() - w.start
        phases = self.clock.totals()
        loss, weight, samples, tokens = _sums(self.strategy, w.loss, w.weight, w.samples, w.tokens)
        _count(w, run, samples, tokens)
        steps = max(w.steps, 1)
        per_device = tokens / elapsed / self.strategy.world
        out = {
            "train/loss": loss / max(weight, 1),  # the mean over every label token (example) of the window's steps
            "train/lr": lr,
            "train/grad_norm": grad_norm,
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
            **memory(self.strategy.device),
        }
        if self.peak:
            out["train/mfu"] = self._mfu(per_device)
        scale = self.strategy.loss_scale()
        if scale is not None:
            out["train/loss_scale"] = scale
        return out

    def _mfu(self, per_device: float) -> float:
        """Model FLOP/s over the peak. Above 1 on a CPU the cached measured peak is too low (it was measured while
        the machine was busy): measure it once more, keep the better one, and say so."""
        mfu = per_device * self.flops_per_token / self.peak
        if mfu > 1 and not self.peak_checked:
            self.peak_checked, old = True, self.peak
            self.peak, _ = mfu_peak(self.strategy.device, self.mixed_precision, remeasure=True)
            warnings.warn(
                f"train/mfu came out at {mfu:.2f}: this run's model FLOP/s exceed the cached {self.peak_source} "
                f"({old / 1e9:.0f} GFLOP/s), which must have been measured while the machine was busy; measured it "
                f"again: {self.peak / 1e9:.0f} GFLOP/s, kept in $SHARDTUNE_CACHE/cpu-peaks.json for later runs", stacklevel=2)
            mfu = per_device * self.flops_per_token / self.peak
        return mfu


def memory(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: GPU allocated/reserved, or host RSS on CPU."""
    if device.type == "cuda":
        return {
            "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def _git_sha() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(world: int) -> dict:
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
        "hardware": {"cpu": platform.processor() or platform.machine(), "gpus": gpus, "num_processes": world},
    }
