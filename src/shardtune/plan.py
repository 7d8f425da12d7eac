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

Meshes: ddp and zero1/2/3 on one data-parallel axis, then each FSDP2 mesh of `mesh.candidates` whose tp/sp divide the
heads. An FSDP2 mesh holds 16Ψ/(dp_shard·sp·cp) of model states, the blocks' Linears (Ψ_tp) once more over tp
(`plan_memory.mesh_state_bytes`: FSDP2 shards over the ranks whose gradients it averages; replicas do not shard),
the gather buffers above over tp, and 1/(tp·sp·cp) of a micro-batch's activations (TP with sequence parallelism splits
them all). The global batch stays batch_size x grad_accum x GPUs sequences: each data-parallel rank runs micro-batches
of batch_size, so a mesh with tp·sp·cp = k runs k times the accumulation steps, each split k ways.

Speed: each layout's step time comes from `plan_time`; the verdict and `choose_strategy` take the fastest that fits
(the simpler within 3%; ZeRO only where no DDP/FSDP2 layout fits). In fp32, or when no timed layout fits, the memory
order stands: ddp > zero1 > zero2 > fsdp ≈ zero3 > zero3_offload (offload: PCIe transfers and a CPU optimizer step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from shardtune import ShardtuneError
from shardtune.config import Config
from shardtune.mesh import Mesh, resolve
from shardtune.plan_time import GPUS, TIE, Cluster, Layout, MeshRow, Work, columns, fastest, layouts, mesh_table, overrides, step_time, why

from shardtune.plan_memory import (  # noqa: F401  (re-exported: the memory arithmetic's home is plan_memory)
    DS_MAX_LIVE_PARAMETERS, DS_REDUCE_BUCKET, GiB, RESERVE_BYTES, RESERVE_FRACTION, SPEED_ORDER, Shape, activation_bytes, buffer_bytes,
    mesh_state_bytes, model_shape, model_state_bytes, parse_memory,
)

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
    cluster: Optional[Cluster] = None
    meshes: tuple[MeshRow, ...] = ()  # fastest first
    mesh: Optional[Mesh] = None  # the mesh of `best`
    grad_accum: int = 1

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    def table(self) -> str:
        """The plan as text: a header, one row per strategy (GiB per GPU), one per mesh (predicted time), the verdict."""
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
        meshes = mesh_table(self.meshes, self.cluster, self.micro_batch * self.grad_accum * self.world, sh.seq_len) if self.meshes else []
        return "\n".join([*head, "", *columns(cols, body), *meshes, "", self.verdict])


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


def plan(cfg: Config, gpus: int, gpu_memory_bytes: int, nodes: int = 1, shape: Optional[Shape] = None,
         cluster: Optional[Cluster] = None, launchable: bool = False) -> Plan:
    """One row per strategy, and one per layout (strategy and mesh) with its predicted step, for `gpus` x `nodes` GPUs.

    `best` is the fastest layout that fits (plan_time.fastest); with `launchable` only among those the config runs as
    it stands (its `dist.mesh`, else one data-parallel axis), as `strategy: auto` at launch cannot change the mesh.
    """
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
    cluster = cluster or Cluster(GPUS["h100"], gpus, nodes)
    mesh_cfg = getattr(cfg.dist, "mesh", None)
    own = None if mesh_cfg is None or mesh_cfg.is_default else resolve(mesh_cfg, world, "fsdp", gpus)
    meshes = mesh_rows(shape, cluster, usable, mp, b, cfg.train.grad_accum, ckpt, rows, own)
    pool = tuple(r for r in meshes if (r.layout == Layout("fsdp", own) if own else r.layout.mesh.one_axis)) if launchable else meshes
    choice = fastest(pool)
    if choice is not None:
        best, mesh, verdict = _name(choice.layout.strategy, world), choice.layout.mesh, why(choice, pool, usable)
        top = fastest(meshes)
        if launchable and top.speed > choice.speed * (1 + TIE):
            verdict = verdict[:-1] + f"; {top.layout.describe()} would be {top.speed / choice.speed - 1:.0%} faster: set {overrides(top.layout)}."
    elif (fit := next((r for r in rows if r.fits), None)) is not None:
        best, mesh = _name(fit.strategy, world), Mesh(dp_shard=world)
        verdict = (f"fastest strategy that fits: {best} ({fit.total / GiB:.1f} of {usable / GiB:.1f} usable GiB per GPU at micro-batch "
                   f"{b}; micro-batches up to {fit.max_micro_batch} fit); " + ("no step time in fp32." if mp == "no" else "no timed layout fits."))
    else:
        best, mesh, verdict = None, None, _remedies(shape, rows, world, usable, mp, b, ckpt)
    return Plan(shape, mp, b, ckpt, gpus, nodes, gpu_memory_bytes, usable, rows, best, verdict, cluster, meshes, mesh, cfg.train.grad_accum)


# ---------------------------------------------------------------- layouts: memory per mesh, predicted step


def mesh_memory(shape: Shape, layout: Layout, rows: tuple[Row, ...], p: int, b: int, ckpt: bool) -> float:
    """Bytes per GPU (module docstring, "Meshes")."""
    if layout.strategy != "fsdp":
        return next(r.total for r in rows if r.strategy == layout.strategy)
    m = layout.mesh
    states = sum(mesh_state_bytes(shape, m).values())
    return states + buffer_bytes(shape, "fsdp", m.world, p) / m.tp + b * activation_bytes(shape, 1, p, ckpt) / (m.tp * m.seq)


def mesh_rows(shape: Shape, cluster: Cluster, usable: float, mp: str, b: int, grad_accum: int, ckpt: bool,
              rows: tuple[Row, ...], own: Optional[Mesh] = None) -> tuple[MeshRow, ...]:
    """Every layout (and the config's own mesh) with its memory and predicted step, fastest first."""
    head_dim = shape.hidden // shape.heads
    found = layouts(cluster.world, cluster.gpus_per_node, shape.heads, max(1, shape.kv_dim // head_dim), shape.seq_len, shape.vocab > 0)
    out = []
    for layout in found + ([Layout("fsdp", own)] if own and Layout("fsdp", own) not in found else []):
        memory = mesh_memory(shape, layout, rows, 4 if mp == "no" else 2, b, ckpt)
        k = layout.mesh.tp * layout.mesh.seq  # the same global batch: k times the micro-batches, each split k ways
        work = Work(shape.num_params, shape.flops_params or shape.num_params, shape.layers, shape.hidden, shape.heads,
                    head_dim, shape.kv_dim, shape.seq_len, b, grad_accum * k, 1.0 if ckpt else 0.0)
        estimate = step_time(work, layout, cluster) if mp in ("bf16", "fp16") else None
        out.append(MeshRow(layout, memory, memory <= usable, estimate))
    return tuple(sorted(out, key=lambda r: -r.speed))


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


def choose_strategy(cfg: Config, gpus: int, gpu_memory: int, nodes: int = 1, shape: Optional[Shape] = None,
                    cluster: Optional[Cluster] = None, launchable: bool = False) -> tuple[str, str, Mesh]:
    """(fastest strategy that fits, the one-line reason, its mesh); ShardtuneError with the remedies when nothing fits."""
    p = plan(cfg, gpus, gpu_memory, nodes, shape, cluster, launchable)
    if p.best is None:
        raise ShardtuneError(p.verdict[0].upper() + p.verdict[1:])
    return p.best, p.verdict, p.mesh
