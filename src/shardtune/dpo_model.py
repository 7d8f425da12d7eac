"""DPO's forward passes: the policy's and the reference model's log-probs of a batch of pairs.

A batch is what data.dpo.collate_pairs returns (chosen_* and rejected_*
tensors of one common length); both sides run as ONE forward of 2B rows,
so DDP / ZeRO / FSDP see one forward per backward, as for every other task.

The reference model:
- LoRA (a PEFT model): the same model with its adapters disabled
  (`PeftModel.disable_adapter()`), under torch.no_grad. No second copy: the
  frozen base weights ARE the reference, and stay so across a resume.
- otherwise: `frozen_reference(model)`, a deep copy with requires_grad off,
  in eval mode. It costs one more copy of the weights (no gradients, no
  optimizer state): for SmolLM2-135M in float32 about 0.54 GB, for a 1B
  model about 4 GB (2 GB in bf16). Take it from the STARTING weights: on
  resume build it from the model as loaded from model.name_or_path, before
  the checkpoint is loaded, or the reference would drift with the policy. A
  sharded model (ZeRO-3, FSDP2) must be copied before it is prepared and the
  copy prepared for inference the same way; a deep copy of a sharded module
  is not a reference.
The reference forward runs in the model's current train/eval mode (as
TRL's does); with dropout > 0 its log-probs are then noisy, so DPO configs
keep model dropout at 0 (LoRA's own dropout is off with adapters disabled).
"""

from __future__ import annotations

import copy

import torch

from shardtune.dpo_loss import sequence_logps
from shardtune.models import is_peft


def concat_pairs(batch: dict) -> dict:
    """The 2B-row model inputs: chosen rows then rejected rows -> input_ids, attention_mask, labels."""
    return {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]]) for key in ("input_ids", "attention_mask", "labels")}


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] chosen and [B] rejected summed response log-probs under `model` (one forward; grads flow)."""
    rows = concat_pairs(batch)
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, rows["labels"]).chunk(2)


def _peft_model(model):
    """The PEFT model inside DDP / DeepSpeed / compile wrappers, or None."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    return inner if is_peft(inner) else None


def frozen_reference(model):
    """A frozen copy of a (plain, not yet sharded) model for reference log-probs; see the module docstring for the cost."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def reference_logps(model, batch: dict, reference=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] chosen and [B] rejected reference log-probs, without grad.

    reference=None: `model` must be a PEFT model (possibly wrapped): its adapters are disabled for this forward.
    Otherwise `reference` (from frozen_reference) computes them and `model` is not used.
    """
    with torch.no_grad():
        if reference is not None:
            return pair_logps(reference, batch)
        peft_model = _peft_model(model)
        if peft_model is None:
            raise ValueError("reference_logps of a model without LoRA adapters needs reference=frozen_reference(model)")
        with peft_model.disable_adapter():
            return pair_logps(model, batch)
