"""Step time per layout (strategy and mesh), before launching: compute at a calibrated fraction of peak, communication
per mesh axis over the link it crosses, and what of it overlaps.

Pure arithmetic over plain numbers (`Work`: model and batch; `Layout`; `Cluster`: GPU type, GPUs per node, bandwidths);
`plan.py` feeds it the model and prints the result. Per GPU, per optimizer step.

Compute: model FLOPs per token 6N + 12·L·H·Q·T (flops.py: attention over the full T×T square). The 6N part runs at
`achievable` x the GPU's dense peak (its FP8 peak with `Work.fp8`), attention at `attention` x that. A rank of a
tp/sp/cp group does 1/(tp·sp·cp) of its micro-batch. Forward is 1/3, backward 2/3; recomputation adds
`Work.recompute` (the recomputed fraction of forward, 1 with gradient checkpointing) of forward to backward.

Communication, bytes per GPU (ring: all-reduce 2(n-1)/n of the buffer, all-gather / reduce-scatter / all-to-all (n-1)/n),
at the bus bandwidth of the link the axis's group crosses x `link_efficiency`: NVLink (or PCIe) within a node; across
nodes the per-GPU network share times the group's ranks on each node (NCCL runs a ring per NIC), at most NVLink. Ranks
are laid out tp innermost, then sp, cp, dp_shard, dp_replicate (mesh.py). Each collective call adds `LATENCY`.

    axis / strategy    volume                                                  when                overlaps with
    tp (Megatron, SP)  2 all-reduce-equivalents of b·s·h bf16 per layer        fwd, bwd, recompute nothing
    sp (Ulysses)       all-to-all of q, k, v and of the output per layer       fwd, bwd, recompute nothing
    cp (ring)          K, V chunks around the ring (and dK, dV in backward)    fwd, bwd, recompute attention
    fsdp dp_shard      all-gather 2Ψ/tp in forward and again in backward,      every micro-batch   forward, backward
                       reduce-scatter 4Ψ/tp (fp32 gradients; zero3: 2Ψ)
    fsdp dp_replicate  all-reduce of the fp32 gradient shard 4Ψ/(tp·dp_shard)  every micro-batch   backward
    ddp                all-reduce of the fp32 gradients 4Ψ (no_sync before)    last micro-batch    its backward
    zero1 / zero2      reduce-scatter 2Ψ (zero1 once, zero2 per micro-batch),  overlap_comm false  nothing
                       all-gather 2Ψ after the optimizer step

Overlapped communication costs max(0, comm - compute it hides behind), plus one layer's share of the sharded
collectives (the first all-gather and the last reduce-scatter have nothing to hide behind); DDP at least its last
25 MiB bucket. The optimizer step moves 28 bytes per local parameter (fp32 weight, grad, Adam m, v) at HBM bandwidth.

Constants (`Constants`; fitted in bench/plan_calibration.py on 4 published runs, checked on 27 held out:
docs/benchmarks.md, "Planner calibration (step-time model)"):

    hopper, ampere   fitted: fraction of the dense peak a well-tuned step reaches in its matmuls (H100/H200; A100)
    attention        fitted: the fraction attention kernels reach relative to that, FLOPs counted over the full square
    link_efficiency  set, 0.8: a collective's bus bandwidth over the link's nominal one-direction bandwidth
    LATENCY          set, 20 us per collective call

Not modelled: pipeline parallelism, compile/fusion (inside `achievable`), kernel launches of tiny models, congestion,
stragglers, data loading, DeepSpeed's engine overhead (so `fastest` prefers DDP/FSDP2 layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from shardtune import ShardtuneError
from shardtune.flops import PEAK_FLOPS_16BIT, gpu_model
from shardtune.mesh import AXES, Mesh, candidates, check_model


@dataclass(frozen=True)
class Constants:
    """Module docstring: fitted fractions of peak (matmuls per GPU generation; attention relative to them), set link efficiency."""

    hopper: float = 0.50
    ampere: float = 0.68
    attention: float = 0.58
    link_efficiency: float = 0.8

    def achievable(self, gpu: "Gpu") -> float:
        return self.hopper if gpu.arch == "hopper" else self.ampere


CONSTANTS = Constants()
OPTIMIZER_BYTES = 28  # per parameter: read fp32 weight, grad, m, v; write weight, m, v
DDP_BUCKET = 25 * (1 << 20)  # torch DDP's bucket_cap_mb default
ZERO_BUCKET = 5e7  # elements: reduce_bucket_size / allgather_bucket_size of launch/deepspeed/*.json
LATENCY = 20e-6  # s per collective call (set, not fitted: NCCL's small-message latency is ~10-50 us)
GB = 1e9


@dataclass(frozen=True)
class Gpu:
    name: str
    peak: float  # dense bf16 FLOP/s (flops.PEAK_FLOPS_16BIT)
    fp8_peak: float  # dense FP8 FLOP/s; 0 = none
    memory_mib: int  # what nvidia-smi reports
    hbm: float  # memory bandwidth, B/s
    intra: float  # one-direction bandwidth to the other GPUs of its node, B/s (NVLink, else PCIe)
    inter: float  # one-direction network bandwidth per GPU across nodes, B/s
    arch: str  # hopper | ampere (Ada parts use the ampere fraction)


# Datasheet figures: NVIDIA H100 / H200 / A100 / L40S / A10 datasheets, Ada whitepaper (RTX 4090); NVLink 4 = 900 GB/s
# bidirectional per GPU, NVLink 3 = 600; PCIe Gen5 x16 = 64 GB/s per direction, Gen4 = 32. Network defaults: one
# 400 Gb/s (NDR) NIC per GPU on H100/H200 systems, 200 Gb/s (HDR) on A100 systems (DGX), 100 Gb/s Ethernet otherwise.
GPUS: dict[str, Gpu] = {
    "h100": Gpu("H100 SXM", PEAK_FLOPS_16BIT["H100 SXM"], 1979e12, 81559, 3.35e12, 450 * GB, 50 * GB, "hopper"),
    "h100-pcie": Gpu("H100 PCIe", PEAK_FLOPS_16BIT["H100 PCIe"], 1513e12, 81559, 2.0e12, 64 * GB, 50 * GB, "hopper"),
    "h200": Gpu("H200", PEAK_FLOPS_16BIT["H200"], 1979e12, 143771, 4.8e12, 450 * GB, 50 * GB, "hopper"),
    "a100": Gpu("A100 80GB SXM", PEAK_FLOPS_16BIT["A100"], 0.0, 81920, 2.039e12, 300 * GB, 25 * GB, "ampere"),
    "a100-40gb": Gpu("A100 40GB SXM", PEAK_FLOPS_16BIT["A100"], 0.0, 40960, 1.555e12, 300 * GB, 25 * GB, "ampere"),
    "l40s": Gpu("L40S", PEAK_FLOPS_16BIT["L40S"], 733e12, 46068, 0.864e12, 32 * GB, 12.5 * GB, "ampere"),
    "a10": Gpu("A10", PEAK_FLOPS_16BIT["A10"], 0.0, 23028, 0.6e12, 32 * GB, 12.5 * GB, "ampere"),
    "rtx4090": Gpu("RTX 4090", PEAK_FLOPS_16BIT["RTX 4090"], 0.0, 24564, 1.008e12, 32 * GB, 12.5 * GB, "ampere"),
}
_BY_PEAK_KEY = {"H100 SXM": "h100", "H100 PCIe": "h100-pcie", "H200": "h200", "A100": "a100", "L40S": "l40s",
                "A10": "a10", "RTX 4090": "rtx4090"}


def gpu_spec(name: str) -> Gpu:
    """'h100', 'a100-40gb', ... or a torch.cuda.get_device_name() string -> its Gpu; one sentence when unknown."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key in GPUS:
        return GPUS[key]
    model = gpu_model(name)
    if model in _BY_PEAK_KEY:
        return GPUS[_BY_PEAK_KEY[model]]
    raise ShardtuneError(f"unknown GPU type {name!r}; choose one of {', '.join(GPUS)}.")


@dataclass(frozen=True)
class Cluster:
    gpu: Gpu
    gpus_per_node: int
    nodes: int = 1
    intra: Optional[float] = None  # B/s; None = the GPU's default
    inter: Optional[float] = None
    allow_tp_across_nodes: bool = False

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def bandwidth(self, crosses: bool) -> float:
        if crosses:
            return self.inter if self.inter is not None else self.gpu.inter
        return self.intra if self.intra is not None else self.gpu.intra


@dataclass(frozen=True)
class Work:
    """One step's work: the model's numbers and the batch each data-parallel rank runs."""

    params: float  # Ψ, all parameters (what is gathered, reduced and stepped)
    flops_params: float  # N of flops.py: non-embedding parameters, output projection included
    layers: int
    hidden: int
    heads: int
    head_dim: int
    kv_dim: int
    seq: int
    micro_batch: int  # sequences per data-parallel rank per micro-batch
    grad_accum: int = 1
    recompute: float = 0.0  # recomputed fraction of forward (1 = full activation checkpointing)
    fp8: bool = False  # Linear layers in FP8

    @property
    def dense_flops(self) -> float:
        return 6.0 * self.flops_params

    @property
    def attention_flops(self) -> float:
        return 12.0 * self.layers * self.heads * self.head_dim * self.seq

    @property
    def flops_per_token(self) -> float:
        return self.dense_flops + self.attention_flops


@dataclass(frozen=True)
class Layout:
    strategy: str  # ddp | zero1 | zero2 | zero3 | fsdp (single_gpu: ddp on one GPU)
    mesh: Mesh

    def describe(self) -> str:
        if self.strategy == "fsdp":
            return f"fsdp {self.mesh.describe()}"
        return "single_gpu" if self.mesh.world == 1 else f"{self.strategy} {self.mesh.world}"


@dataclass(frozen=True)
class Estimate:
    step_s: float
    tokens_per_s_gpu: float
    mfu: float  # model FLOPs per second over the bf16 peak
    compute_s: float  # forward + backward (+ recompute) of all micro-batches
    exposed_s: dict = field(default_factory=dict)  # what each axis adds to the step, s
    crosses: tuple = ()  # axes whose groups cross nodes

    @property
    def bound(self) -> str:
        """What the step waits on beyond compute: the axis adding the most, or 'compute'."""
        worst = max(self.exposed_s.items(), key=lambda kv: kv[1], default=("compute", 0.0))
        return worst[0] if worst[1] > 0.05 * self.step_s else "compute"


def _stride(mesh: Mesh, axis: str) -> int:
    """Rank distance between neighbours of an `axis` group: the product of the axes inside it."""
    out = 1
    for inner in AXES[AXES.index(axis) + 1:]:
        out *= getattr(mesh, inner)
    return out


def crosses_nodes(mesh: Mesh, gpus_per_node: int) -> tuple[str, ...]:
    """The axes whose groups span ranks of more than one node (tp innermost, dp_replicate outermost)."""
    return tuple(a for a in AXES if getattr(mesh, a) > 1 and _stride(mesh, a) * getattr(mesh, a) > gpus_per_node)


def _bandwidth(mesh: Mesh, axis: str, cluster: Cluster, crosses: bool) -> float:
    """Bus bandwidth of one rank of an `axis` group: NVLink within a node; across nodes, the network share of the
    group's ranks on each node (NCCL runs a ring per NIC: k ranks of the group on a node move k NICs' worth), at most
    NVLink."""
    intra = cluster.bandwidth(False)
    per_node = max(1, cluster.gpus_per_node // _stride(mesh, axis))
    return min(intra, per_node * cluster.bandwidth(True)) if crosses else intra


def step_time(work: Work, layout: Layout, cluster: Cluster, constants: Constants = CONSTANTS) -> Estimate:
    """Predicted seconds per optimizer step and tokens/s per GPU (module docstring)."""
    mesh = layout.mesh
    if mesh.world != cluster.world:
        raise ShardtuneError(f"the mesh {mesh.describe()} has {mesh.world} ranks, the cluster {cluster.world} GPUs.")
    cross = crosses_nodes(mesh, cluster.gpus_per_node)
    if "tp" in cross and not cluster.allow_tp_across_nodes:
        raise ShardtuneError(f"tp {mesh.tp} is more than the {cluster.gpus_per_node} GPUs of one node, so every layer's "
                             "all-reduce would cross the network; use tp <= GPUs per node, or allow tp across nodes.")
    bw = {a: _bandwidth(mesh, a, cluster, a in cross) * constants.link_efficiency for a in AXES}
    bw["dp"] = bw["dp_replicate" if mesh.dp_replicate > 1 else "dp_shard"]  # ddp and zero: one data-parallel axis
    fwd, attn = _forward_seconds(work, mesh, cluster.gpu, constants.achievable(cluster.gpu), constants.attention)
    bwd = fwd * (2 + work.recompute)
    per_mb = _model_parallel(work, mesh, bw, attn)
    dp_mb, dp_step, local = _data_parallel(work, layout, bw, fwd, bwd)
    exposed = {"optimizer": OPTIMIZER_BYTES * local / cluster.gpu.hbm}
    for times, part in ((work.grad_accum, per_mb), (work.grad_accum, dp_mb), (1, dp_step)):
        for axis, seconds in part.items():
            exposed[axis] = exposed.get(axis, 0.0) + times * seconds
    compute = work.grad_accum * (fwd + bwd)
    step = compute + sum(exposed.values())
    tokens = mesh.dp * work.grad_accum * work.micro_batch * work.seq / mesh.world / step
    exposed = {k: v for k, v in exposed.items() if v > 0}
    if layout.strategy != "fsdp":
        cross = tuple("dp" if a.startswith("dp") else a for a in cross)
    return Estimate(step, tokens, tokens * work.flops_per_token / cluster.gpu.peak, compute, exposed, cross)


def _forward_seconds(work: Work, mesh: Mesh, gpu: Gpu, achievable: float, attention_share: float) -> tuple[float, float]:
    """(forward seconds of one micro-batch on one GPU, of which attention) at `achievable` of peak."""
    if work.fp8 and not gpu.fp8_peak:
        raise ShardtuneError(f"{gpu.name} has no FP8 tensor cores; plan it in bf16.")
    tokens = work.micro_batch * work.seq / (mesh.tp * mesh.seq)
    dense_peak = gpu.fp8_peak if work.fp8 else gpu.peak
    attention = tokens * work.attention_flops / gpu.peak / (achievable * attention_share) / 3
    return tokens * work.dense_flops / dense_peak / achievable / 3 + attention, attention


def _model_parallel(work: Work, mesh: Mesh, bw: dict, attention: float) -> dict:
    """Exposed seconds per micro-batch of the tp, sp and cp collectives (module docstring)."""
    act = 2.0 * work.micro_batch * work.seq / mesh.seq * work.hidden  # one layer's b·s·h on one rank, bf16
    passes, (t, u, c) = 2 + work.recompute, (mesh.tp, mesh.sp, mesh.cp)
    tp = passes * (4 * (t - 1) / t * act / bw["tp"] + 2 * LATENCY) if t > 1 else 0.0
    qkvo = act * (2 * work.hidden + 2 * work.kv_dim) / work.hidden / t
    sp = passes * ((u - 1) / u * qkvo / bw["sp"] + 2 * LATENCY) if u > 1 else 0.0
    kv = act * 2 * work.kv_dim / work.hidden / t
    cp = max(0.0, (1 + passes) * (c - 1) * kv / bw["cp"] * work.layers - attention * (1 + passes)) if c > 1 else 0.0
    return {"tp": work.layers * tp, "sp": work.layers * sp, "cp": cp}


def _data_parallel(work: Work, layout: Layout, bw: dict, fwd: float, bwd: float) -> tuple[dict, dict, float]:
    """(exposed seconds per micro-batch by axis, exposed seconds per step by axis, parameters stepped locally)."""
    mesh, psi, s = layout.mesh, work.params, layout.strategy
    n, axis = mesh.dp, "dp"
    if s == "ddp":
        if n == 1:
            return {}, {}, psi
        allreduce = 2 * (n - 1) / n * 4 * psi / bw[axis]
        last_bucket = 2 * (n - 1) / n * min(DDP_BUCKET, 4 * psi) / bw[axis]  # ready only when backward ends
        return {}, {axis: max(allreduce - bwd, last_bucket) + LATENCY}, psi
    if s in ("zero1", "zero2"):
        gather = (n - 1) / n * 2 * psi / bw[axis] + -(-psi // ZERO_BUCKET) * LATENCY  # per bucket
        per_mb = {axis: gather} if s == "zero2" else {}
        last = 0.0 if s == "zero2" else gather
        return per_mb, {axis: gather + last}, psi / n
    d, r = mesh.dp_shard, mesh.dp_replicate
    local, calls = psi / mesh.tp, work.layers * LATENCY  # one collective of each kind per layer
    reduce_bytes = 2 if s == "zero3" else 4
    gather = ((d - 1) / d * 2 * local / bw["dp_shard"] + calls) if d > 1 else 0.0
    scatter = ((d - 1) / d * reduce_bytes * local / bw["dp_shard"] + calls) if d > 1 else 0.0
    allreduce = (2 * (r - 1) / r * 4 * local / d / bw["dp_replicate"] + calls) if r > 1 else 0.0
    first_last = (gather + scatter + allreduce) / work.layers
    shard = max(0.0, gather - fwd) + max(0.0, gather + scatter - bwd) + first_last
    replicate = max(0.0, gather + scatter + allreduce - bwd) - max(0.0, gather + scatter - bwd)
    return {"dp_shard": shard, "dp_replicate": replicate}, {}, local / d


# ---------------------------------------------------------------- layouts, the choice, the table

SIMPLE_FIRST = ("ddp", "zero1", "zero2", "fsdp", "zero3")
TIE = 0.03  # predictions this close count as equal (well inside the model's error): the simpler layout is taken
GiB = 1 << 30


@dataclass(frozen=True)
class MeshRow:
    """One layout: memory per GPU at the config's micro-batch and checkpointing, whether it fits, its predicted step."""

    layout: Layout
    memory: float
    fits: bool
    estimate: Optional[Estimate]  # None where there is no time model (fp32)

    @property
    def speed(self) -> float:
        return self.estimate.tokens_per_s_gpu if self.estimate else 0.0


def layouts(world: int, gpus_per_node: int, heads: int, kv_heads: int, seq_len: int, causal: bool) -> list[Layout]:
    """DDP and ZeRO-1/2/3 on one data-parallel axis, then every FSDP2 mesh of mesh.candidates the model splits along."""
    if world == 1:
        return [Layout("ddp", Mesh())]
    out = [Layout(s, Mesh(dp_shard=world)) for s in ("ddp", "zero1", "zero2", "zero3")]
    for m in candidates(world, gpus_per_node):
        if m.sp > 1 and m.tp > 1:  # Ulysses and TP both split heads: distributed/parallel.py refuses the pair
            continue
        try:
            check_model(m, heads, kv_heads, seq_len, causal)
        except ShardtuneError:
            continue
        out.append(Layout("fsdp", m))
    return out


def fastest(rows) -> Optional[MeshRow]:
    """The fastest layout that fits; among those within TIE of it, the simplest (ddp first, fewest mesh axes).

    ZeRO layouts only where no DDP / FSDP2 one fits: DeepSpeed's engine adds per-step work this model does not count
    (flattening and bucketing in Python; 1.6-1.7x DDP's step on CPU, docs/benchmarks.md "Sharding")."""
    fit = [r for r in rows if r.fits and r.estimate]
    fit = [r for r in fit if r.layout.strategy in ("ddp", "fsdp")] or fit
    if not fit:
        return None
    top = max(r.speed for r in fit)
    simple = lambda r: (SIMPLE_FIRST.index(r.layout.strategy), sum(s > 1 for s in r.layout.mesh.shape[1:]), -r.speed)  # noqa: E731
    return min((r for r in fit if r.speed >= top * (1 - TIE)), key=simple)


def overrides(layout: Layout) -> str:
    """The config keys that select `layout` (dist.mesh.dp_shard=-1, the default, fills the rest)."""
    keys = [f"dist.strategy={layout.strategy}"]
    return " ".join(keys + [f"dist.mesh.{a}={getattr(layout.mesh, a)}" for a in ("dp_replicate", "cp", "sp", "tp")
                            if getattr(layout.mesh, a) > 1])


def seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 0.1 else f"{t * 1e3:.2f} ms"


def why(choice: MeshRow, rows, usable: float) -> str:
    """One line: the choice and its prediction, how far behind the runner-up is and why, a faster layout left out."""
    e, world, zero = choice.estimate, choice.layout.mesh.world, lambda r: r.layout.strategy.startswith("zero")  # noqa: E731
    name = "single_gpu" if world == 1 else choice.layout.strategy
    mesh = f", mesh {choice.layout.mesh.describe()}" if choice.layout.strategy == "fsdp" else ""
    text = (f"fastest strategy that fits: {name}{mesh} ({overrides(choice.layout)}): predicted {seconds(e.step_s)}/step, "
            f"{e.tokens_per_s_gpu:,.0f} tokens/s/GPU (MFU {e.mfu:.0%}), {choice.memory / GiB:.1f} of {usable / GiB:.1f} usable GiB per GPU")
    fit = [r for r in rows if r.fits and r.estimate and r is not choice]
    others = [r for r in fit if zero(r) == zero(choice)]
    if others:
        nxt = max(others, key=lambda r: r.speed)
        gap = 1 - nxt.speed / e.tokens_per_s_gpu
        lacks = f"{nxt.estimate.bound} communication exposed" if nxt.estimate.bound != "compute" else "more compute per GPU"
        text += (f"; {nxt.layout.describe()} predicts {-gap:.1%} more, within {TIE:.0%}: the simpler layout is taken" if gap < 0
                 else f"; next {nxt.layout.describe()} is {gap:.1%} slower ({lacks})")
    skipped = max((r for r in fit if zero(r) and not zero(choice)), key=lambda r: r.speed, default=None)
    if skipped and skipped.speed > e.tokens_per_s_gpu * (1 + TIE):
        text += (f"; {skipped.layout.describe()} predicts {skipped.speed / e.tokens_per_s_gpu - 1:.0%} more, but DeepSpeed's "
                 "engine overhead is not modelled")
    faster = next((r for r in rows if not r.fits and r.estimate and r.speed > e.tokens_per_s_gpu * (1 + TIE)), None)
    if faster:
        text += f"; {faster.layout.describe()} would be {faster.speed / e.tokens_per_s_gpu - 1:.0%} faster but needs {faster.memory / GiB:.1f} GiB"
    return text + "."


def columns(cols: list[str], body: list[list[str]]) -> list[str]:
    """Aligned text columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(cols, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(cols), *(fmt(r) for r in body)]


def mesh_table(rows, cluster: Cluster, sequences: int, seq_len: int) -> list[str]:
    """The layouts fastest first: memory, fits, predicted step, tokens/s/GPU, MFU, what is exposed, what crosses nodes."""
    g = cluster.gpu
    head = (f"Predicted step per layout, fastest first: {cluster.world} x {g.name} ({cluster.gpus_per_node} per node; "
            f"{cluster.bandwidth(False) / GB:.0f} GB/s within a node, {cluster.bandwidth(True) / GB:.1f} GB/s per GPU across nodes); "
            f"global batch {sequences:,} x {seq_len} tokens; shardtune.plan_time")
    cols = ["layout", "GiB/GPU", "fits", "step", "tokens/s/GPU", "MFU", "exposed per step", "crosses nodes"]
    body = []
    for r in rows:
        e = r.estimate
        exposed = ", ".join(f"{k} {seconds(v)}" for k, v in sorted(e.exposed_s.items(), key=lambda kv: -kv[1])
                            if v >= 0.01 * e.step_s) if e else ""
        body.append([r.layout.describe(), f"{r.memory / GiB:.2f}", "yes" if r.fits else "no", seconds(e.step_s) if e else "n/a",
                     f"{e.tokens_per_s_gpu:,.0f}" if e else "n/a", f"{e.mfu:.0%}" if e else "", exposed or "-",
                     ", ".join(e.crosses) if e and e.crosses else "-"])
    return ["", head, "", *columns(cols, body)]
