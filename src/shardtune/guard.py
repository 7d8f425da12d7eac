"""What all ranks decide together at each optimizer step, in one collective, before the optimizer steps.

- non-finite: a NaN/Inf loss on any rank, or a non-finite grad norm, skips the
  update on every rank (parameters and optimizer state stay as they were);
  after `train.nonfinite_patience` such steps in a row the loop rolls back to
  the newest checkpoint from before them and goes on with the data after
  the bad window; non-finite steps again right after a rollback stop the run
  with a message.
- stop: a preemption signal reached some rank (preempt.py).
- save: `train.save_every_minutes` have passed on some rank's clock.
- writing: some rank's background checkpoint write is still going (the
  checkpoint is sealed at the first step where no rank's is);
- out of data: some rank could not take the next step's micro-batches (a finite
  stream ran out there); the Trainer fetches them before this agreement, so
  every rank stops after this step and no rank trains on padding.

Each rank contributes its flags and takes the sum over ranks, so all ranks act
at the same step even when only one of them saw the event. Flags stay on the
device until that one read, so the step does not wait on the GPU twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from shardtune.preempt import Preemption


@dataclass
class Verdict:
    nonfinite: bool
    stop: bool
    save: bool
    out_of_data: bool = False
    writing: bool = False  # some rank's background checkpoint write is not finished


class StepChecks:
    def __init__(self, strategy, save_every_minutes: float | None, preemption: Preemption):
        self.strategy = strategy
        self.preemption = preemption
        self.save_every_s = save_every_minutes * 60 if save_every_minutes else None
        self.last_save = time.monotonic()
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=strategy.device)

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Called on each micro-batch's loss; stays on the device."""
        self.loss_bad = self.loss_bad | ~torch.isfinite(loss.detach())

    def agree(self, grad_norm: torch.Tensor | None, has_next: bool = True, writing: bool = False) -> Verdict:
        """Collective: call on every rank once per optimizer step, after the gradients are complete."""
        bad = self.loss_bad
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float())
        due = self.save_every_s is not None and time.monotonic() - self.last_save >= self.save_every_s
        host = [float(self.preemption.received is not None), float(due), float(not has_next), float(writing)]
        flags = self.strategy.all_reduce_sum(torch.cat([bad.float().reshape(1), torch.tensor(host, device=self.strategy.device)]))
        nonfinite, stop, save, out, still_writing = (v > 0 for v in flags.tolist())
        self.loss_bad = torch.zeros_like(self.loss_bad)
        if stop:
            self.preemption.acknowledge()
        return Verdict(nonfinite, stop, save, out, still_writing)

    def everyone_has(self, has: bool) -> bool:
        """Collective: whether every rank has the first step's micro-batches."""
        return self.strategy.all_reduce_sum(torch.tensor([float(not has)], device=self.strategy.device)).item() == 0

    def saved(self) -> None:
        self.last_save = time.monotonic()
