"""The run's device mesh as plain numbers: which axes, how large, which rank sits where, and whether a model fits it.

Pure: no torch.distributed, no files; the launcher, the planner and the strategy layer all ask it, so a bad mesh is
one sentence before anything is spawned. `distributed/fsdp.py` turns a `Mesh` into torch's `DeviceMesh`.

Axes, outermost first (as torchtitan orders them, so the innermost axes are neighbouring ranks of one node):

    dp_replicate  data-parallel replicas: gradients all-reduced between them (HSDP's inter-node axis)
    dp_shard      data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2)
    cp            context parallelism: ring attention, each rank 1/cp of every sequence (CUDA only)
    sp            sequence parallelism: Ulysses all-to-all, each rank 1/sp of every sequence, whole heads per rank
    tp            tensor parallelism: each block's matmuls split over the ranks of one node

Data: the data-parallel ranks (dp_replicate x dp_shard) are the data slots; the ranks of one cp/sp/tp group read
the same batch (cp/sp then split its sequence). The ranks whose tokens differ (dp x cp x sp, the "batch" ranks) are
what token counts and metrics are summed over, and what FSDP2 averages gradients over.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardtune import ShardtuneError

AXES = ("dp_replicate", "dp_shard", "cp", "sp", "tp")


@dataclass(frozen=True)
class Mesh:
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    sp: int = 1
    tp: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.sp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the data slots."""
        return self.dp_replicate * self.dp_shard

    @property
    def seq(self) -> int:
        """Ranks that split one sequence (cp or sp)."""
        return self.cp * self.sp

    @property
    def batch(self) -> int:
        """Ranks whose tokens differ: sums of tokens and metrics, and FSDP2's gradient average, run over these."""
        return self.dp * self.seq

    @property
    def one_axis(self) -> bool:
        """Nothing but one data-parallel axis: what every strategy ran before the mesh."""
        return self.dp_replicate == 1 and self.seq == 1 and self.tp == 1

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> its index on every axis (row-major over AXES)."""
        out, rest = {}, rank
        for axis in reversed(AXES):
            size = getattr(self, axis)
            out[axis], rest = rest % size, rest // size
        return {a: out[a] for a in AXES}

    def dp_rank(self, rank: int) -> int:
        """The data slot of `rank`: its index among the data-parallel ranks."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def seq_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["cp"] * self.sp + c["sp"]

    def describe(self) -> str:
        parts = [f"{a} {getattr(self, a)}" for a in AXES if getattr(self, a) > 1]
        return " x ".join(parts) if parts else "one process"


def resolve(cfg, world: int, strategy: str, gpus_per_node: int | None = None) -> Mesh:
    """`dist.mesh` (config.MeshConfig) for `world` ranks under `strategy`; one sentence when it cannot be."""
    fixed = cfg.dp_replicate * cfg.tp * cfg.sp * cfg.cp
    named = f"dp_replicate {cfg.dp_replicate} x tp {cfg.tp} x sp {cfg.sp} x cp {cfg.cp}"
    if cfg.dp_shard == -1:
        if world % fixed:
            raise ShardtuneError(f"dist.mesh ({named} = {fixed}) does not divide the {world} processes; "
                                 f"choose axes whose product divides {world}, or launch a multiple of {fixed} processes.")
        shard = world // fixed
    else:
        shard = cfg.dp_shard
        if fixed * shard != world:
            raise ShardtuneError(f"dist.mesh ({named} x dp_shard {shard} = {fixed * shard}) must multiply to the {world} processes launched; "
                                 "set dist.mesh.dp_shard=-1 to fill, or change the axes.")
    mesh = Mesh(dp_replicate=cfg.dp_replicate, dp_shard=shard, cp=cfg.cp, sp=cfg.sp, tp=cfg.tp)
    if not mesh.one_axis and strategy != "fsdp":
        raise ShardtuneError(f"dist.mesh {mesh.describe()} runs under strategy fsdp (FSDP2 on the data-parallel axes), "
                             f"not {strategy}; launch with --strategy fsdp (or set dist.strategy: fsdp).")
    if cfg.cp > 1:
        raise ShardtuneError("dist.mesh.cp (ring attention) is not built yet: torch's context_parallel runs on CUDA only and is "
                             "untested here; split sequences with dist.mesh.sp (Ulysses) instead.")
    if cfg.sp > 1 and cfg.cp > 1:
        raise ShardtuneError("dist.mesh sets both sp and cp; split sequences one way: sp (Ulysses, CPU and GPU) or cp (ring attention, CUDA).")
    if gpus_per_node and cfg.tp > gpus_per_node and not cfg.allow_tp_across_nodes:
        raise ShardtuneError(f"dist.mesh.tp {cfg.tp} is more than the {gpus_per_node} GPUs of one node, so every layer's all-reduce would "
                             "cross the network; use tp <= GPUs per node, or set dist.mesh.allow_tp_across_nodes=true.")
    return mesh


def check_model(mesh: Mesh, heads: int, kv_heads: int, seq_len: int, causal: bool) -> None:
    """Refuse, in one sentence, a mesh this model's shape cannot be split along."""
    for axis, size in (("tp", mesh.tp), ("sp", mesh.sp)):
        if size > 1 and (heads % size or kv_heads % size):
            raise ShardtuneError(f"dist.mesh.{axis} {size} must divide the model's {heads} attention heads and {kv_heads} key/value heads; "
                                 f"choose {axis} among {', '.join(str(d) for d in _divisors(heads, kv_heads))}.")
    if mesh.seq > 1:
        if not causal:
            raise ShardtuneError("dist.mesh.sp/cp split sequences of causal-LM tasks (causal_lm, sft); this task's examples are not split.")
        need = mesh.seq * (2 if mesh.cp > 1 else 1)  # ring attention balances causal work with 2 chunks per rank
        if seq_len % need:
            raise ShardtuneError(f"the sequence length {seq_len} must be divisible by {need} for dist.mesh {mesh.describe()}; "
                                 f"set data.seq_len to a multiple of {need}.")


def check_run(mesh: Mesh, model_config, cfg) -> None:
    """`check_model` for a transformers config and a run config (config.Config), plus what the run asks of the mesh."""
    from shardtune.config import LM_TASKS, TASK_SPECS

    plan = getattr(model_config, "base_model_tp_plan", None) or {}
    if mesh.tp > 1 and not {"colwise", "rowwise"} & set(plan.values()):
        raise ShardtuneError(f"{type(model_config).__name__} declares no tensor-parallel plan (base_model_tp_plan), so dist.mesh.tp cannot "
                             "split it; use a Llama-family model, or shard it with dp_shard instead of tp.")
    heads = getattr(model_config, "num_attention_heads", 1)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    check_model(mesh, heads, kv_heads, TASK_SPECS[cfg.task].seq_len_of(cfg), cfg.task in LM_TASKS)
    if mesh.seq > 1 and cfg.train.eval_prompts:
        raise ShardtuneError("train.eval_prompts are generated one prompt per rank, which dist.mesh.sp cannot split; drop them for this run.")


def _divisors(a: int, b: int) -> list[int]:
    return [d for d in range(1, min(a, b) + 1) if a % d == 0 and b % d == 0]


def candidates(world: int, gpus_per_node: int) -> list[Mesh]:
    """Every mesh of `world` ranks the planner weighs: tp within a node (powers of two), HSDP across nodes, sp too."""
    nodes = max(1, world // max(1, gpus_per_node))
    out = []
    for tp in _powers_of_two(min(gpus_per_node, world)):
        for sp in _powers_of_two(gpus_per_node // tp):
            dp = world // (tp * sp)
            if dp * tp * sp != world:
                continue
            for replicate in sorted({1, nodes} | ({dp} if dp > 1 else set())):
                if dp % replicate == 0:
                    out.append(Mesh(dp_replicate=replicate, dp_shard=dp // replicate, sp=sp, tp=tp))
    return out


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(max(1, limit).bit_length()) if 1 << i <= limit]
