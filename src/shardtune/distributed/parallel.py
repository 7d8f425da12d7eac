"""The run's `mesh.Mesh` as torch's `DeviceMesh`, and what is applied along its axes besides FSDP2.

- `build_device_mesh`: one named DeviceMesh over every rank (axes as mesh.AXES), and the sub-meshes the rest asks
  for: FSDP2's data-parallel mesh (`dp_shard`, `cp` and `sp` flattened into one shard axis, as torchtitan's
  `dp_shard_cp`, so gradients are averaged over every rank whose tokens differ; with `dp_replicate` > 1 a 2-D
  (replicate, shard) mesh: HSDP), the "batch" group token counts and metrics are summed over, and the tp/sp groups.
- `apply_tensor_parallel`: torch's `parallelize_module` with the model's own tensor-parallel plan
  (transformers' `config.base_model_tp_plan`: colwise q/k/v/gate/up, rowwise o/down), so every block's matmuls
  are split over the tp ranks; embeddings, norms and the (chunked-loss) head stay whole on every tp rank.
- `apply_sequence_parallel`: DeepSpeed's Ulysses attention for HF models (`UlyssesSPAttentionHF`, from ALST):
  each rank holds 1/sp of the sequence; attention all-to-alls to whole sequences over 1/sp of the heads. Built
  here rather than by DeepSpeed's `register_with_transformers`, which makes its own groups of consecutive ranks
  (not the mesh's sp groups) and fixes the batch size that every eval batch and short last batch must then have.
- `grad_norm_and_clip`: the global grad norm when parameters live on different meshes.

Glue, and why it is written here: torch's `clip_grad_norm_` wants every gradient on one mesh. torchtitan gets
that by making every parameter a DTensor of the tp mesh (vocab-parallel embedding and loss, sequence-parallel
norms); shardtune's chunked loss needs the whole vocabulary row on each rank, so the embeddings, norms and head
stay replicated, and the norm is summed per mesh instead (a dozen lines).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shardtune import ShardtuneError
from shardtune.mesh import AXES, Mesh


@dataclass
class DeviceMeshes:
    root: object  # torch DeviceMesh, named axes AXES
    fsdp: object  # the data-parallel mesh FSDP2 shards (and replicates) over
    tp: object | None
    sp_group: object | None
    batch_group: object | None  # the ranks whose tokens differ; None = all ranks


def build_device_mesh(mesh: Mesh, device_type: str) -> DeviceMeshes:
    from torch.distributed.device_mesh import init_device_mesh

    root = init_device_mesh(device_type, mesh.shape, mesh_dim_names=AXES)
    shard = root["dp_shard", "cp", "sp"]._flatten("dp_shard_seq")
    fsdp = root["dp_replicate", "dp_shard_seq"] if mesh.dp_replicate > 1 else shard
    batch = root["dp_replicate", "dp_shard", "cp", "sp"]._flatten("batch")
    return DeviceMeshes(
        root=root, fsdp=fsdp, tp=root["tp"] if mesh.tp > 1 else None, sp_group=root["sp"].get_group() if mesh.sp > 1 else None,
        batch_group=batch.get_group() if mesh.tp > 1 else None,
    )


def tensor_parallel_plan(model: torch.nn.Module) -> dict[str, object]:
    """The model's tensor-parallel plan as torch ParallelStyles, keyed by module patterns under the base model."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    chosen = {pattern: styles[kind]() for pattern, kind in plan.items() if kind in styles}
    if not chosen:
        raise ShardtuneError(f"{type(model).__name__} declares no tensor-parallel plan (config.base_model_tp_plan), so dist.mesh.tp "
                             "cannot split it; use a Llama-family model, or shard it with dp_shard instead of tp.")
    return chosen


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    if hasattr(model, "peft_config"):
        raise ShardtuneError("LoRA adapters are not split by dist.mesh.tp; train LoRA with dp_shard (FSDP2) instead of tp.")
    base = getattr(model, model.base_model_prefix)
    parallelize_module(base, tp_mesh, tensor_parallel_plan(model))


def apply_sequence_parallel(model: torch.nn.Module, mesh: Mesh, sp_group) -> None:
    """DeepSpeed's Ulysses attention over this rank's sp group, in place of the model's attention kernel."""
    import deepspeed
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if mesh.tp > 1:
        raise ShardtuneError("dist.mesh sets both sp and tp; DeepSpeed's Ulysses attention splits whole heads over sp ranks, "
                             "which tp also splits: use one of them.")
    kernel = model.config._attn_implementation
    if kernel not in ("sdpa", "flash_attention_2"):
        raise ShardtuneError(f"dist.mesh.sp runs with model.attention sdpa or flash_attention_2, not {kernel}; set model.attention=sdpa.")
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    c = model.config.get_text_config()
    ulysses = _any_batch_ulysses()(
        attn=ALL_ATTENTION_FUNCTIONS[kernel], batch_size=1, attn_head_count=c.num_attention_heads,
        attn_head_size=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, kv_head_count=c.num_key_value_heads,
        num_hidden_layers=c.num_hidden_layers, process_group=sp_group, seq_length_is_variable=True,
    )

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        # the mask transformers built is for the local chunk; Ulysses attends causally over the gathered positions
        return ulysses(module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[kernel] = attention  # as DeepSpeed's register_with_transformers does, with our sp group


def _any_batch_ulysses():
    """UlyssesSPAttentionHF for any number of rows: DeepSpeed fixes the batch size at construction (its training
    loaders have one), but eval batches and an epoch's last batch differ; the shapes it checks follow each call."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    class AnyBatch(UlyssesSPAttentionHF):
        def forward(self, module, query, key, value, attention_mask, *args, **kwargs):
            rows = self.batch_size = query.shape[0]
            self.required_query_shape = torch.Size([1, rows, *self.required_query_shape[2:]])
            self.required_key_value_shape = torch.Size([1, rows, *self.required_key_value_shape[2:]])
            self.required_context_shape = torch.Size([1, rows, *self.required_context_shape[2:]])
            return super().forward(module, query, key, value, attention_mask, *args, **kwargs)

    return AnyBatch


def split_sequence(batch: dict, rank: int, world: int) -> dict:
    """This rank's 1/world of every sequence of a causal-LM batch: inputs, their global positions and the labels
    shifted on the whole sequence first (`shift_labels`), so the token after a chunk's last one is still its target."""
    from shardtune.losses import IGNORE_INDEX, shift_labels

    ids = batch["input_ids"]
    length = ids.shape[1]
    if length % world:
        raise ShardtuneError(f"a batch of {length}-token sequences cannot be split over {world} sequence-parallel ranks; "
                             f"make data.seq_len a multiple of {world}.")
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand_as(ids)
    chunk = slice(rank * length // world, (rank + 1) * length // world)
    targets = shift_labels(batch["labels"])
    out = {"input_ids": ids[:, chunk], "position_ids": positions[:, chunk], "shift_labels": targets[:, chunk],
           # rows with a target, counted by the group's first rank only (the others hold parts of the same rows)
           "samples": (targets != IGNORE_INDEX).any(-1).sum() * (rank == 0)}
    if "attention_mask" in batch:
        out["attention_mask"] = batch["attention_mask"][:, chunk]
    return out


def grad_norm_and_clip(parameters, max_norm: float | None) -> torch.Tensor:
    """The global 2-norm of the gradients (plain tensor), after clipping them to max_norm. Gradients are grouped by
    the mesh they live on; each group's norm (a DTensor) is made whole and the squares summed."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.nn.Parameter]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    # a 2-D (dp, tp) group's norm is reduced over both axes one after the other; torch logs that as suboptimal at
    # every step, for four floats
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm is not None and math.isfinite(max_norm):
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
