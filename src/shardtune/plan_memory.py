"""Memory per GPU, the arithmetic under `shardtune plan`: model states per strategy and per mesh, activations,
transient buffers, and the model's shape counted on the meta device. The formulas and their sources are in plan.py's
module docstring; this module holds them as code so that plan.py (the plan, its table, the choice) stays readable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardtune import ShardtuneError
from shardtune.config import TASK_SPECS, Config
from shardtune.mesh import Mesh

GiB = 1 << 30
SPEED_ORDER = ("ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload")
RESERVE_BYTES, RESERVE_FRACTION = 1 * GiB, 0.05
# Mirror launch/deepspeed/*.json (tests/test_plan.py checks that they agree).
DS_REDUCE_BUCKET = 5e7
DS_MAX_LIVE_PARAMETERS = 1e9
_UNITS = {"": None, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '24G', '81920MiB' -> bytes. GB/MB are SI (10^9); GiB and a bare G are 2^30."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    factor = _UNITS.get(m.group(2).lower()) if m else None
    if not factor or float(m.group(1)) <= 0:
        raise ShardtuneError(f"--gpu-memory {text!r} is not a memory size with a unit; write it like 80GiB, 80GB, 24G or 81920MiB.")
    return int(float(m.group(1)) * factor)


def model_state_bytes(num_params: int, strategy: str, world: int, mixed_precision: str) -> dict[str, float]:
    """Per-rank bytes of params, grads, the fp32 master copy and the Adam moments (table in the module docstring)."""
    if strategy not in ("cpu", "single_gpu", *SPEED_ORDER):
        raise ShardtuneError(f"unknown strategy {strategy!r}; choose one of cpu, single_gpu, {', '.join(SPEED_ORDER)}.")
    psi, n = float(num_params), max(1, world)
    if strategy in ("cpu", "single_gpu", "ddp"):
        return {"params": 4 * psi, "grads": 4 * psi, "master": 0.0, "optim": 8 * psi}
    if strategy == "fsdp":
        return {"params": 4 * psi / n, "grads": 4 * psi / n, "master": 0.0, "optim": 8 * psi / n}
    p = 4 if mixed_precision == "no" else 2
    stage = 3 if strategy.startswith("zero3") else int(strategy[-1])
    return {"params": p * psi / (n if stage >= 3 else 1), "grads": p * psi / (n if stage >= 2 else 1), "master": 4 * psi / n, "optim": 8 * psi / n}


# ---------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about a model; see model_shape()."""

    name: str
    num_params: int  # Ψ: unique parameters
    layers: int
    hidden: int
    heads: int
    kv_dim: int
    ffn: int
    gated: bool
    dropout: bool
    eager: bool
    vocab: int  # logits per token at the loss (0 = classification: negligible)
    layer_params: int  # one decoder/encoder layer
    seq_len: int
    flops_params: int = 0  # N of flops.py (non-embedding, output projection included); 0 = num_params
    tp_params: int = 0  # parameters in the model's tensor-parallel plan (the blocks' colwise/rowwise Linears)


def meta_model(cfg: Config):
    """The model the config builds, on the meta device (no weights): its config and parameter shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from shardtune.models import load_causal_lm, load_tokenizer, resolve_model

    m, causal = cfg.model, TASK_SPECS[cfg.task].causal
    try:
        if causal and m.init == "scratch":
            tokenizer = load_tokenizer(m)  # the vocab comes from it
            with torch.device("meta"):
                return load_causal_lm(m.model_copy(update={"gradient_checkpointing": False}), tokenizer)
        source = resolve_model(m.name_or_path)
        if causal:
            mcfg = AutoConfig.from_pretrained(source, trust_remote_code=m.trust_remote_code)
            auto = AutoModelForCausalLM
        else:
            labels = len(cfg.data.labels) if cfg.data.labels else 2  # the head is h x labels: negligible
            extra = {"hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.dropout} if m.dropout is not None else {}
            mcfg = AutoConfig.from_pretrained(source, num_labels=labels, trust_remote_code=m.trust_remote_code, **extra)
            auto = AutoModelForSequenceClassification
        with torch.device("meta"):
            return auto.from_config(mcfg, trust_remote_code=m.trust_remote_code)
    except OSError as exc:
        raise ShardtuneError(
            f"could not read the config of model {m.name_or_path!r} ({type(exc).__name__}); "
            "point model.name_or_path at a local folder or a packaged model."
        ) from None


def _decoder_layers(model, layers: int):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise ShardtuneError(f"cannot find the {layers} layers of {type(model).__name__}; the planner knows Llama- and BERT-like models.")


def model_shape(cfg: Config) -> Shape:
    """Count Ψ and read the dimensions from the model the config builds, on the meta device."""
    from shardtune.flops import non_embedding_params

    model = meta_model(cfg)
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    layer = _decoder_layers(model, c.num_hidden_layers)[0]
    drop = [getattr(c, k, 0) or 0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout")]
    return Shape(
        name=type(model).__name__,
        num_params=sum(p.numel() for p in model.parameters()),
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=heads,
        kv_dim=(getattr(c, "num_key_value_heads", None) or heads) * head_dim,
        ffn=c.intermediate_size,
        gated=any("gate" in n for n, _ in layer.named_parameters()),
        dropout=any(float(x) > 0 for x in drop),
        eager=getattr(c, "_attn_implementation", None) == "eager",
        vocab=c.vocab_size if TASK_SPECS[cfg.task].causal else 0,
        layer_params=sum(p.numel() for p in layer.parameters()),
        seq_len=TASK_SPECS[cfg.task].seq_len_of(cfg),
        flops_params=non_embedding_params(model),
        tp_params=tensor_parallel_params(model),
    )


def tensor_parallel_params(model) -> int:
    """Parameters that dist.mesh.tp splits: the modules of the model's own plan (config.base_model_tp_plan) that
    distributed/parallel.py parallelizes (colwise, rowwise); the rest (embeddings, norms, head) stay whole per tp rank."""
    import fnmatch

    plan = {k: v for k, v in (getattr(model.config, "base_model_tp_plan", None) or {}).items() if v in ("colwise", "rowwise")}
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    return sum(p.numel() for name, module in base.named_modules() if any(fnmatch.fnmatchcase(name, pat) for pat in plan)
               for p in module.parameters(recurse=False))


def mesh_state_bytes(shape: Shape, mesh: Mesh) -> dict[str, float]:
    """Per-rank bytes of params, grads and Adam moments of an FSDP2 mesh (fp32 storage): FSDP2 shards every parameter over
    dp_shard x cp x sp (one flattened axis: the ranks whose gradients it averages), tp splits the plan's Linears once
    more, replicas (dp_replicate) hold the same shard."""
    shard = mesh.dp_shard * mesh.seq
    per_rank = shape.tp_params / (shard * mesh.tp) + (shape.num_params - shape.tp_params) / shard
    return {"params": 4 * per_rank, "grads": 4 * per_rank, "master": 0.0, "optim": 8 * per_rank}


# ---------------------------------------------------------------- activations and buffers


def activation_bytes(shape: Shape, micro_batch: int, p: int, checkpointing: bool) -> float:
    """Peak activation bytes per GPU for one micro-batch (formula in the module docstring)."""
    s, b, h, d = shape.seq_len, micro_batch, shape.hidden, int(shape.dropout)
    attention = p * (3 * h + 2 * shape.kv_dim) + d * h
    mlp = p * h + 4 * p * shape.ffn if shape.gated else p * h + 2 * p * shape.ffn + d * h
    layer = s * b * (attention + mlp + 2 * p * h)
    if shape.eager:
        layer += shape.heads * s * s * b * (p + d * (1 + p))
    top = 2 * p * s * b * h  # final norm and head inputs
    logits = s * b * shape.vocab * (p + 12)
    stored = shape.layers * p * s * b * h + layer if checkpointing else shape.layers * layer
    return stored + top + logits


def buffer_bytes(shape: Shape, strategy: str, world: int, p: int) -> float:
    """Transient communication / gather buffers per GPU (module docstring)."""
    psi = shape.num_params
    if strategy == "ddp":
        return 4.0 * psi if world > 1 else 0.0
    if strategy in ("zero1", "zero2"):
        return DS_REDUCE_BUCKET * p
    if strategy in ("zero3", "zero3_offload"):
        return (min(psi, DS_MAX_LIVE_PARAMETERS) + DS_REDUCE_BUCKET) * p
    root = psi - shape.layers * shape.layer_params  # fsdp: embeddings, head, final norm stay one unit
    return (root + 2 * shape.layer_params) * p + (root + shape.layer_params) * 4.0
