"""Progress: a bar on a terminal, plain log lines otherwise (Slurm logs must not fill with redraws)."""

from __future__ import annotations

import sys
import time


SHOWN = ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s", "train/mfu", "train/data_wait_fraction")


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in SHOWN if k in metrics)


class Progress:
    def __init__(self, total: int, enabled: bool, mode: str = "auto", start: int = 0):
        self.total, self.enabled, self.first = total, enabled, start
        self.start = time.perf_counter()
        use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Called every log_every steps with the window's metrics."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(_fmt({k: v for k, v in metrics.items() if k in ("train/loss", "train/tokens_per_s")}))
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        print(f"step {step}/{self.total} {_fmt(metrics)} elapsed={elapsed:.0f}s eta={eta:.0f}s", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
