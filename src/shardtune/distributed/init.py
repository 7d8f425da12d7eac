"""What model-building code needs to know about sharded parameters, without knowing the backend."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def unsharded_init():
    """Models built inside are plain ones even while a ZeRO-3 run is set up (transformers would zero.Init them)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter: a ZeRO-3 partition holds none locally (ds_numel); a DTensor reports the global size."""
    return getattr(p, "ds_numel", None) or p.numel()
