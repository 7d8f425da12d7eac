"""The parameters whole for a rollout (`Strategy.generating`): gathered once per `generate` call, released after.

Generation is inference with a KV cache: one forward per new token. Under ZeRO-3 and FSDP2 every forward
all-gathers each layer's parameters and frees them again, so a rollout of T tokens would gather the model T
times (the stalls TRL users report with ZeRO-3). Here a rollout gathers once:

- ZeRO-3: DeepSpeed's `GatheredParameters` over every parameter, and its per-module fetch/release hooks off
  meanwhile (with them on, each module's forward would still coordinate, and release what the context gathered);
  the hooks are registered again after, and the parameter coordinator's recorded trace dropped (generation ran
  other modules in another order than training). TRL's `unwrap_model_for_generation` does the same; shardtune
  does not depend on TRL at run time, so the few lines are here.
- FSDP2: every `FSDPModule` unsharded (one all-gather each) with resharding after forward off, resharded after.
  The root's `generate` is registered as a forward (`FSDPStrategy.prepare`, torch's `register_fsdp_forward_method`):
  a PeftModel's generate never calls its own forward, and FSDP2 must initialise the root before its blocks.

Hand-written because neither backend offers "whole for the next N forwards" as one call.
"""

from __future__ import annotations

import contextlib

import torch


def _offload(engine):
    """The ZeRO-3 parameter offload object that owns the module hooks (DeepSpeedZeRoOffload)."""
    optimizer = engine.optimizer
    return optimizer.parameter_offload if hasattr(optimizer, "parameter_offload") else optimizer


@contextlib.contextmanager
def zero3_gathered(engine):
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        offload = _offload(engine)
        for param in module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            coordinator = getattr(offload, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def fsdp_unsharded(model: torch.nn.Module):
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)
