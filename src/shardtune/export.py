"""`shardtune export CHECKPOINT --out DIR`: any checkpoint -> a plain HF safetensors folder.

DDP and FSDP2 checkpoints are torch.distributed.checkpoint shards, read back
whole in one process; ZeRO checkpoints hold per-rank shards that DeepSpeed's
own consolidation turns into one fp32 state dict (distributed.checkpoint_weights). The
model skeleton is built on the meta device and the tensors are assigned into
it, so memory holds one copy of the weights, not two; large models are
written as sharded safetensors files. A LoRA run's skeleton is wrapped by
PEFT the way training wrapped it (so the keys match) and is written merged or
as the adapter alone, per model.lora.merge.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from shardtune import ShardtuneError
from shardtune.checkpoint import LABELS_FILE, check_checkpoint, read_state, write_json
from shardtune.config import TASK_SPECS, validate
from shardtune.models import is_peft, save_lora


def checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from a checkpoint of any strategy, in one process (fp32 for ZeRO)."""
    from shardtune.distributed import checkpoint_weights

    return checkpoint_weights(ckpt)


def _skeleton(cfg, labels):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from shardtune.models import adapter_base_name, add_lora, load_causal_lm, load_tokenizer, resolve_model

    tokenizer = load_tokenizer(cfg.model)
    lora = cfg.model.lora
    with torch.device("meta"):
        if not TASK_SPECS[cfg.task].causal:
            mcfg = AutoConfig.from_pretrained(
                resolve_model(cfg.model.name_or_path), num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={lab: i for i, lab in enumerate(labels)}, trust_remote_code=cfg.model.trust_remote_code,
            )
            model = AutoModelForSequenceClassification.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
        else:
            bare = {"init": "scratch", "gradient_checkpointing": False, "lora": None}
            model = load_causal_lm(cfg.model.model_copy(update=bare), tokenizer)
        if lora is not None:
            base = adapter_base_name(cfg.model.name_or_path) if cfg.model.init == "pretrained" else None
            model = add_lora(model, lora, "CAUSAL_LM" if TASK_SPECS[cfg.task].causal else "SEQ_CLS", base)
    return model, tokenizer


def export_checkpoint(ckpt: Path, out: Path, max_shard_size: str = "2GB", merge: bool | None = None) -> Path:
    """merge: for a LoRA run, None = as its model.lora.merge says, True = a plain merged folder, False = the adapter."""
    why = check_checkpoint(ckpt) if ckpt.is_dir() else "no such folder"
    if why:
        raise ShardtuneError(f"cannot export {ckpt}: {why}; pass a complete checkpoint folder (runs/.../checkpoints/step-N).")
    saved = read_state(ckpt)
    cfg = validate(saved.config)
    labels = saved.labels
    lora = cfg.model.lora
    if lora is not None and cfg.model.init == "scratch" and merge is False:
        raise ShardtuneError(f"{ckpt} is a LoRA run on a from-scratch model, whose base weights exist only merged with the adapter; export it merged.")
    model, tokenizer = _skeleton(cfg, labels)
    state = checkpoint_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise ShardtuneError(f"the weights in {ckpt} do not fit its config's model (missing {sorted(set(missing) - tied)[:3]}); the checkpoint is damaged.")
    model.tie_weights()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_peft(model):
        save_lora(model, tmp, merge=lora.merge if merge is None else merge, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    if labels:
        write_json(tmp / LABELS_FILE, {"id2label": dict(enumerate(labels))})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
