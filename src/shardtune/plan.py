"""Memory per GPU for each strategy, before launching: does it fit, and how large a micro-batch.

Ψ is the model's parameter count, counted on the meta device (no weights are
allocated); N the number of GPUs in all (`--gpus` x `--nodes`); p the bytes of
a compute-dtype element (2 in bf16/fp16, 4 with `train.mixed_precision: no`).
Every figure is bytes per GPU (per rank).

Model states (`model_state_bytes`), wherever they live:

    strategy        params   grads    master   optim (Adam m, v)
    ddp/cpu/single  4Ψ       4Ψ       0        8Ψ
    fsdp            4Ψ/N     4Ψ/N     0        8Ψ/N
    zero1           pΨ       pΨ       4Ψ/N     8Ψ/N
    zero2           pΨ       pΨ/N     4Ψ/N     8Ψ/N
    zero3, _offload pΨ/N     pΨ/N     4Ψ/N     8Ψ/N

DeepSpeed rows are the ZeRO paper's mixed-precision accounting (2Ψ + 2Ψ +
12Ψ, the 12Ψ sharded from stage 1, grads from 2, params from 3) with the paper's
K=12 split into a separate fp32 master copy (4Ψ) and the Adam moments (8Ψ). In
fp32, DeepSpeed 0.19 still keeps the master as a separate clone
(docs/benchmarks.md, "Sharding"), hence p = 4 and the same rows. DDP and FSDP2
run mixed precision under Accelerate by autocast / FSDP2's cast-on-gather: the
stored weights and grads stay fp32 and the optimizer steps them directly, so
there is no master copy (same 16Ψ, resp. 16Ψ/N, total as the paper).
`optim` is what `shardtune.dist.state_bytes` reports as `dist/optim_state_bytes`
and `params` what it reports as `dist/param_bytes`.

Placement: zero3_offload keeps all model states in CPU RAM (`offload_param` and
`offload_optimizer` in launch/deepspeed/zero3_offload.json): the `CPU RAM`
column. Transient GPU buffers: DDP's gradient buckets, a copy of all grads
(4Ψ, Accelerate's default `gradient_as_bucket_view=False`, only when N > 1);
ZeRO-1/2 one reduce bucket; ZeRO-3 the gathered parameters it may keep live,
min(Ψ, stage3_max_live_parameters) x p, plus a reduce bucket; FSDP2 the
unsharded root module (embeddings, head) and two decoder layers (current and
prefetched), and their unsharded grads.

Activations per micro-batch b, sequence s, hidden h, a heads, KV width k,
MLP width f, L layers (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", eq. 1: sbh(34 + 5as/h) bytes per
layer in 16-bit), term by term so it also covers GQA, gated MLPs and
dropout-free models; with k = h, f = 4h, dropout and p = 2 it is exactly 34sbh:

    attention  sb(p(3h + 2k) + d·h)        qkv input, Q, K, V, o_proj input, dropout mask
    MLP        sb(p·h + 2p·f + d·h)         input, act in/out (gated: p·h + 4p·f, no mask)
    norms      sb·2p·h
    scores     a·s²·b(p + d(1 + p))         eager attention only: SDPA / flash kernels
                                            recompute them in backward (the 5as/h term)

d = 1 when the model has dropout (1-byte masks), else 0. With gradient
checkpointing (one checkpoint per layer) only each layer's input is kept, L·p·sbh,
plus one layer recomputed in full during backward. A causal LM adds its logits
at the loss: s·b·V·(p + 12) bytes (the logits, their fp32 log-softmax kept for
backward, and the two fp32 gradients alive in the loss's backward). All terms
are linear in b, so the largest micro-batch is solved for directly.

A GPU is usable up to its memory less a reserve of 1 GiB + 5% (CUDA context,
cuBLAS/NCCL workspaces, allocator fragmentation).

Speed order, fastest first, for the verdict and `choose_strategy`:
ddp > zero1 > zero2 > fsdp ≈ zero3 > zero3_offload. DDP all-reduces 2Ψ per step
with no partition bookkeeping; ZeRO-1/2 move the same volume but add it (1.6-1.7x
DDP's step on our CPU runs); FSDP and ZeRO-3 move 1.5x the volume and gather
parameters per layer (FSDP2 first: no Python hooks per module); offload adds
PCIe transfers and a CPU optimizer step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from shardtune import ShardtuneError
from shardtune.config import TASK_SPECS, Config

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
    return {
        "params": p * psi / (n if stage >= 3 else 1),
        "grads": p * psi / (n if stage >= 2 else 1),
        "master": 4 * psi / n,
        "optim": 8 * psi / n,
    }


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


def _meta_model(cfg: Config):
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
    model = _meta_model(cfg)
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
    )


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


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Row:
    strategy: str
    params: float
    grads: float
    optim: float  # fp32 master + Adam moments on the GPU
    buffers: float
    act: float  # at the micro-batch, without gradient checkpointing
    act_ckpt: float  # ... with it
    host: float  # model states in CPU RAM (offload)
    total: float  # with the config's gradient checkpointing setting
    fits: bool
    max_micro_batch: int  # with the config's setting; 0 = not even 1
    max_micro_batch_ckpt: int


@dataclass(frozen=True)
class Plan:
    shape: Shape
    mixed_precision: str
    micro_batch: int
    checkpointing: bool
    gpus: int
    nodes: int
    gpu_memory: int
    usable: float
    rows: tuple[Row, ...]
    best: Optional[str]  # fastest strategy that fits (single_gpu when there is one GPU)
    verdict: str

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    def table(self) -> str:
        """The plan as text: a header, one row per strategy (GiB per GPU), the verdict."""
        sh, gib = self.shape, lambda x: f"{x / GiB:.2f}"
        ckpt = "on" if self.checkpointing else "off"
        head = [
            f"{sh.name}: {sh.num_params:,} parameters, {self.mixed_precision if self.mixed_precision != 'no' else 'fp32'}, "
            f"sequence {sh.seq_len}, micro-batch {self.micro_batch}, gradient checkpointing {ckpt}",
            f"{self.world} GPU(s) ({self.nodes} node(s) x {self.gpus}) of {self.gpu_memory / GiB:.2f} GiB, "
            f"{self.usable / GiB:.2f} GiB usable each; GiB per GPU, `total` counts activations with checkpointing {ckpt}",
        ]
        cols = ["strategy", "params", "grads", "optim", "buffers", "act", "act ckpt", "total", "fits", "max micro-batch", "CPU RAM"]
        body = [
            [_name(r.strategy, self.world), gib(r.params), gib(r.grads), gib(r.optim), gib(r.buffers), gib(r.act), gib(r.act_ckpt),
             gib(r.total), "yes" if r.fits else "no", str(r.max_micro_batch), gib(r.host) if r.host else "-"]
            for r in self.rows
        ]
        widths = [max(len(x) for x in col) for col in zip(cols, *body)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        return "\n".join([*head, "", fmt(cols), *(fmt(r) for r in body), "", self.verdict])


def usable_bytes(gpu_memory: int) -> float:
    return gpu_memory * (1 - RESERVE_FRACTION) - RESERVE_BYTES


def _row(shape: Shape, strategy: str, world: int, usable: float, mp: str, b: int, ckpt: bool) -> Row:
    p = 4 if mp == "no" else 2
    st = model_state_bytes(shape.num_params, strategy, world, mp)
    on_gpu = strategy != "zero3_offload"
    params, grads, optim = (st["params"], st["grads"], st["master"] + st["optim"]) if on_gpu else (0.0, 0.0, 0.0)
    fixed = params + grads + optim + buffer_bytes(shape, strategy, world, p)
    per_sample = {c: activation_bytes(shape, 1, p, c) for c in (False, True)}
    room = usable - fixed
    best_b = {c: max(0, int(room // per_sample[c])) for c in (False, True)}
    total = fixed + b * per_sample[ckpt]
    return Row(
        strategy, params, grads, optim, fixed - params - grads - optim, b * per_sample[False], b * per_sample[True],
        0.0 if on_gpu else sum(st.values()), total, total <= usable, best_b[ckpt], best_b[True],
    )


def _rows(shape: Shape, world: int, usable: float, mp: str, b: int, ckpt: bool) -> tuple[Row, ...]:
    return tuple(_row(shape, s, world, usable, mp, b, ckpt) for s in SPEED_ORDER)


def _name(strategy: str, world: int) -> str:
    return "single_gpu" if strategy == "ddp" and world == 1 else strategy


def plan(cfg: Config, gpus: int, gpu_memory_bytes: int, nodes: int = 1, shape: Optional[Shape] = None) -> Plan:
    """One row per strategy for `gpus` GPUs per node x `nodes`, each with `gpu_memory_bytes`."""
    if gpus < 1 or nodes < 1:
        raise ShardtuneError(
            f"plan needs at least one GPU on at least one node, got --gpus {gpus} --nodes {nodes}; "
            "for CPU processes there is nothing to plan: use `shardtune launch --gpus 0`."
        )
    shape = shape or model_shape(cfg)
    # auto is bf16 on the GPUs a plan is for (compute capability 8.0+; hardware.native_bf16 decides at run time)
    mp = "bf16" if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    b, ckpt = cfg.train.batch_size, cfg.model.gradient_checkpointing
    world, usable = gpus * nodes, usable_bytes(gpu_memory_bytes)
    rows = _rows(shape, world, usable, mp, b, ckpt)
    fit = next((r for r in rows if r.fits), None)
    if fit is not None:
        best = _name(fit.strategy, world)
        verdict = (
            f"fastest strategy that fits: {best} ({fit.total / GiB:.1f} of {usable / GiB:.1f} usable GiB per GPU at micro-batch {b}; "
            f"micro-batches up to {fit.max_micro_batch} fit)."
        )
    else:
        best, verdict = None, _remedies(shape, rows, world, usable, mp, b, ckpt)
    return Plan(shape, mp, b, ckpt, gpus, nodes, gpu_memory_bytes, usable, rows, best, verdict)


def _remedies(shape: Shape, rows, world: int, usable: float, mp: str, b: int, ckpt: bool) -> str:
    """The sentence for 'nothing fits': what it needs, each lever that would make it fit, and those that would not."""
    least = min(rows, key=lambda r: r.total)
    fixes = []
    if not ckpt and (r := next((r for r in rows if r.total - r.act + r.act_ckpt <= usable), None)):
        fixes.append(f"model.gradient_checkpointing=true and {_name(r.strategy, world)}")
    if r := next((r for r in rows if r.max_micro_batch >= 1), None):
        keep = "raise train.grad_accum to keep the global batch"
        fixes.append(f"train.batch_size={r.max_micro_batch} and {_name(r.strategy, world)} ({keep})")
    elif not ckpt and (r := next((r for r in rows if r.max_micro_batch_ckpt >= 1), None)):
        fixes.append(f"model.gradient_checkpointing=true, train.batch_size={r.max_micro_batch_ckpt} and {_name(r.strategy, world)}")
    more = next(((w, r) for w in (world * 2**k for k in range(1, 11)) for r in _rows(shape, w, usable, mp, b, ckpt) if r.fits), None)
    if more:
        fixes.append(f"{more[0]} GPUs in all and {more[1].strategy}")
    notes = []
    if not more:
        floor = min(r.total - r.params - r.grads - r.optim for r in rows)  # what sharding cannot shrink
        need = f"activations and buffers alone need {floor / GiB:.1f} GiB per GPU at this micro-batch"
        notes.append(f"more GPUs alone would not help, as {need}")
    if not any("zero3_offload" in f for f in fixes):
        notes.append("offloading (zero3_offload) alone would not help either")
    if ckpt:
        notes.append("gradient checkpointing is already on")
    todo = "it would fit with " + "; or with ".join(fixes) if fixes else (
        "it needs a GPU with more memory, a shorter sequence (data.seq_len / model.max_length) or a smaller model"
    )
    head = (
        f"nothing fits in {usable / GiB:.1f} usable GiB per GPU on {world} GPU(s) at micro-batch {b} "
        f"(the least is {least.total / GiB:.1f} GiB, with {_name(least.strategy, world)})"
    )
    return "; ".join([head, todo, *notes]) + "."


def choose_strategy(cfg: Config, gpus: int, gpu_memory: int, nodes: int = 1, shape: Optional[Shape] = None) -> tuple[str, str]:
    """(fastest strategy that fits, the verdict sentence); ShardtuneError with the remedies when nothing fits."""
    p = plan(cfg, gpus, gpu_memory, nodes, shape)
    if p.best is None:
        raise ShardtuneError(p.verdict[0].upper() + p.verdict[1:])
    return p.best, p.verdict
