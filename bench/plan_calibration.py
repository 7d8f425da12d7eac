"""The step-time model (shardtune.plan_time) against published training throughput of other systems.

Each row is one published measurement: model, GPUs, layout, batch, activation recomputation, precision, and the
tokens/s per GPU the system reported. The planner predicts the same run from its numbers alone; the table prints
published, predicted and predicted/published. Rows marked `fit` are the only ones the three fitted constants
(plan_time.Constants: hopper, ampere, attention) were chosen on (`--fit` redoes that search: least squares of the log
ratio over those rows; link_efficiency is set, not fitted); every other row is held out. tests/test_plan_time.py
checks the bounds stated in docs/benchmarks.md against this same data.

Sources (files of the systems' own repositories, as stored at the commits named):

  torchtitan   pytorch/torchtitan@b5bcd76, benchmarks/llama3_h100_202412_torchtitan.md (Tables 1-4),
               benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md (vanilla-TP bf16 rows),
               benchmarks/llama3-8b_h200_202506_trainy-whitefiber.md; sequence length and activation
               checkpointing from train_configs/llama3_{8b,70b}.toml at the benchmarks' commit 9dec370 (8192; 8B
               selective per-op: every second matmul recomputed; 70B full).
  Megatron-Bridge  NVIDIA-NeMo/Megatron-Bridge@067f987, docs/performance-summary-archive.md, "25.11 NeMo Container",
               DGX-H100 (only its LLAMA3_8B row has no pipeline parallelism; 70B and 405B use PP 4-8: skipped);
               recompute from scripts/performance/configs/llama/llama3_workload_base_configs.py at 97ad8cc
               (full recompute of 5 of 32 layers).
  llm-foundry  mosaicml/llm-foundry@8c8dd48, scripts/train/benchmarking/README.md (MPT, FSDP FULL_SHARD, bf16;
               A100 table: 1600 Gb/s per node = 200 Gb/s per GPU). MPT shapes from scripts/train/yamls/pretrain.

Hardware as published: torchtitan's H100s are SXM parts with HBM2e capped at 500 W (the file says their peak lies
between H100 SXM and NVL); they are planned as H100 SXM, so those rows carry that difference. Float8 rows run
the Linear layers in FP8 (torchtitan float8 tensorwise, Megatron FP8 current scaling).

Run: `.venv/bin/python bench/plan_calibration.py [--fit]` (pure arithmetic, well under a second).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shardtune.mesh import Mesh  # noqa: E402
from shardtune.plan_time import CONSTANTS, GB, Cluster, Constants, Layout, Work, gpu_spec, step_time  # noqa: E402

TT = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md"
TT_ASYNC = "torchtitan benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md"
TT_H200 = "torchtitan benchmarks/llama3-8b_h200_202506_trainy-whitefiber.md"
MB = "Megatron-Bridge docs/performance-summary-archive.md (25.11, DGX-H100)"
LF = "llm-foundry scripts/train/benchmarking/README.md"


@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # per projection; gated = 3 projections
    gated: bool
    vocab: int
    tied: bool
    learned_positions: bool = False


LLAMA3_8B = Arch(32, 4096, 32, 8, 14336, True, 128256, False)
LLAMA3_70B = Arch(80, 8192, 64, 8, 28672, True, 128256, False)
MPT = {name: Arch(layers, hidden, hidden // 128, hidden // 128, 4 * hidden, False, 50368, True, True)
       for name, layers, hidden in (("760m", 24, 1536), ("1b", 24, 2048), ("3b", 32, 2560), ("7b", 32, 4096),
                                    ("13b", 40, 5120), ("30b", 48, 7168), ("70b", 80, 8192))}


def params(a: Arch, seq: int) -> tuple[float, float]:
    """(all parameters Ψ, flops.py's N: without the input embedding and position tables, with the output projection)."""
    h, kv = a.hidden, a.hidden // a.heads * a.kv_heads
    layer = 2 * h * h + 2 * h * kv + (3 if a.gated else 2) * h * a.ffn + 2 * h
    body = a.layers * layer + h
    embed = a.vocab * h + (seq * h if a.learned_positions else 0)
    head = a.vocab * h
    return body + embed + (0 if a.tied else head), body + head


@dataclass(frozen=True)
class Row:
    source: str
    label: str
    arch: Arch
    gpu: str
    gpus: int
    mesh: Mesh
    seq: int
    micro_batch: int  # sequences per data-parallel rank per micro-batch
    grad_accum: int
    recompute: float
    published: float  # tokens/s per GPU
    fp8: bool = False
    inter_gbps: float = 0.0  # network Gb/s per GPU when the source states it (0 = the GPU's default)
    fit: bool = False

    @property
    def system(self) -> str:
        return self.source.split()[0]


SAC_8B = (4096 * 1024 + 4096 * 4096 + 4096 * 14336) / (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
# torchtitan per-op SAC recomputes every second matmul of a block: wk, wo, w3 of q, k, v, o, w1, w3, w2 (~37% of it)


def _fsdp(n: int) -> Mesh:
    return Mesh(dp_shard=n)


ROWS: tuple[Row, ...] = (
    Row(TT, "Llama3 8B, FSDP 8, SAC, eager (T1)", LLAMA3_8B, "h100", 8, _fsdp(8), 8192, 2, 1, SAC_8B, 5762),
    Row(TT, "Llama3 8B, FSDP 8, SAC, compile (T1)", LLAMA3_8B, "h100", 8, _fsdp(8), 8192, 2, 1, SAC_8B, 6667, fit=True),
    Row(TT, "Llama3 8B, FSDP 128, SAC, eager (T3)", LLAMA3_8B, "h100", 128, _fsdp(128), 8192, 2, 1, SAC_8B, 5605, inter_gbps=400),
    Row(TT, "Llama3 8B, FSDP 128, SAC, compile (T3)", LLAMA3_8B, "h100", 128, _fsdp(128), 8192, 2, 1, SAC_8B, 6514, inter_gbps=400),
    Row(TT, "Llama3 8B, FSDP 8, SAC, compile, float8 (T1)", LLAMA3_8B, "h100", 8, _fsdp(8), 8192, 2, 1, SAC_8B, 8532, fp8=True),
    Row(TT, "Llama3 8B, FSDP 8, seq 32k, full AC, float8 (T2)", LLAMA3_8B, "h100", 8, _fsdp(8), 32768, 1, 1, 1.0, 3890, fp8=True),
    Row(TT, "Llama3 8B, FSDP 4 x CP 2, seq 64k, float8 (T2)", LLAMA3_8B, "h100", 8, Mesh(dp_shard=4, cp=2), 65536, 1, 1, 1.0, 2540, fp8=True),
    Row(TT, "Llama3 8B, FSDP 2 x CP 4, seq 128k, float8 (T2)", LLAMA3_8B, "h100", 8, Mesh(dp_shard=2, cp=4), 131072, 1, 1, 1.0, 1071, fp8=True),
    Row(TT, "Llama3 8B, CP 8, seq 256k, float8 (T2)", LLAMA3_8B, "h100", 8, Mesh(cp=8), 262144, 1, 1, 1.0, 548, fp8=True),
    Row(TT, "Llama3 70B, FSDP 32 x TP 8, full AC, float8 (T4)", LLAMA3_70B, "h100", 256, Mesh(dp_shard=32, tp=8), 8192, 16, 1, 1.0, 829,
        fp8=True, inter_gbps=400),
    Row(TT_ASYNC, "Llama3 70B, FSDP 32 x TP 8, full AC, bf16", LLAMA3_70B, "h100", 256, Mesh(dp_shard=32, tp=8), 8192, 16, 1, 1.0, 597.3,
        inter_gbps=400),
    Row(TT_ASYNC, "Llama3 8B, FSDP 8 x TP 8, SAC, bf16", LLAMA3_8B, "h100", 64, Mesh(dp_shard=8, tp=8), 8192, 12, 1, SAC_8B, 4378,
        inter_gbps=400),
    Row(TT_H200, "Llama3 8B, FSDP 32, SAC, float8", LLAMA3_8B, "h200", 32, _fsdp(32), 8192, 2, 1, SAC_8B, 10938, fp8=True, inter_gbps=400),
    Row(TT_H200, "Llama3 8B, FSDP 64, SAC, float8", LLAMA3_8B, "h200", 64, _fsdp(64), 8192, 2, 1, SAC_8B, 10753, fp8=True, inter_gbps=400),
    Row(MB, "LLAMA3_8B, FSDP 8, FP8-CS, recompute 5/32", LLAMA3_8B, "h100", 8, _fsdp(8), 8192, 1, 16, 5 / 32, 14451, fp8=True),
    Row(LF, "MPT-760m, seq 2k, FSDP 32", MPT["760m"], "h100", 32, _fsdp(32), 2048, 24, 1, 0.0, 67971),
    Row(LF, "MPT-1b, seq 2k, FSDP 8", MPT["1b"], "h100", 8, _fsdp(8), 2048, 14, 1, 0.0, 45455),
    Row(LF, "MPT-1b, seq 32k, FSDP 8", MPT["1b"], "h100", 8, _fsdp(8), 32768, 1, 4, 0.0, 12025, fit=True),
    Row(LF, "MPT-3b, seq 2k, FSDP 64", MPT["3b"], "h100", 64, _fsdp(64), 2048, 6, 3, 0.0, 22525),
    Row(LF, "MPT-7b, seq 2k, FSDP 8", MPT["7b"], "h100", 8, _fsdp(8), 2048, 6, 1, 0.0, 10643, fit=True),
    Row(LF, "MPT-7b, seq 8k, FSDP 8, AC", MPT["7b"], "h100", 8, _fsdp(8), 8192, 8, 2, 1.0, 6935),
    Row(LF, "MPT-13b, seq 2k, FSDP 64", MPT["13b"], "h100", 64, _fsdp(64), 2048, 2, 1, 0.0, 4800),
    Row(LF, "MPT-13b, seq 2k, FSDP 512, AC", MPT["13b"], "h100", 512, _fsdp(512), 2048, 16, 1, 1.0, 4952),
    Row(LF, "MPT-30b, seq 2k, FSDP 8, AC", MPT["30b"], "h100", 8, _fsdp(8), 2048, 3, 21, 1.0, 2002),
    Row(LF, "MPT-70b, seq 2k, FSDP 64, AC", MPT["70b"], "h100", 64, _fsdp(64), 2048, 8, 4, 1.0, 1039),
    Row(LF, "MPT-70b, seq 2k, FSDP 512, AC", MPT["70b"], "h100", 512, _fsdp(512), 2048, 8, 1, 1.0, 1007),
    Row(LF, "MPT-1b, seq 2k, FSDP 8 (A100)", MPT["1b"], "a100", 8, _fsdp(8), 2048, 14, 4, 0.0, 20513),
    Row(LF, "MPT-7b, seq 2k, FSDP 8 (A100)", MPT["7b"], "a100", 8, _fsdp(8), 2048, 6, 2, 0.0, 4641, fit=True),
    Row(LF, "MPT-13b, seq 8k, FSDP 8, AC (A100)", MPT["13b"], "a100", 8, _fsdp(8), 8192, 5, 3, 1.0, 1795),
    Row(LF, "MPT-30b, seq 2k, FSDP 8, AC (A100)", MPT["30b"], "a100", 8, _fsdp(8), 2048, 3, 21, 1.0, 916),
    Row(LF, "MPT-70b, seq 2k, FSDP 64, AC (A100)", MPT["70b"], "a100", 64, _fsdp(64), 2048, 8, 4, 1.0, 410, inter_gbps=200),
)


def work(row: Row) -> Work:
    psi, n = params(row.arch, row.seq)
    a = row.arch
    return Work(psi, n, a.layers, a.hidden, a.heads, a.hidden // a.heads, a.hidden // a.heads * a.kv_heads, row.seq,
                row.micro_batch, row.grad_accum, row.recompute, row.fp8)


def predict(row: Row, constants: Constants = CONSTANTS):
    per_node = min(8, row.gpus)
    cluster = Cluster(gpu_spec(row.gpu), per_node, row.gpus // per_node, inter=row.inter_gbps / 8 * GB if row.inter_gbps else None)
    return step_time(work(row), Layout("fsdp", row.mesh), cluster, constants)


def ratios(constants: Constants = CONSTANTS) -> list[float]:
    """predicted / published, per row of ROWS."""
    return [predict(r, constants).tokens_per_s_gpu / r.published for r in ROWS]


def fit() -> Constants:
    """The constants minimizing the sum of squared log(predicted / published) over the `fit` rows, on a grid (steps
    0.01 for the fractions, 0.05 for the link efficiency). The Hopper fraction and the link efficiency are searched
    together on the Hopper rows, then the Ampere fraction on the A100 rows (the two sets share no GPU)."""
    rows = [r for r in ROWS if r.fit]

    def loss(c: Constants, arch: str) -> float:
        return sum(math.log(predict(r, c).tokens_per_s_gpu / r.published) ** 2 for r in rows if gpu_spec(r.gpu).arch == arch)

    fractions, shares = [x / 100 for x in range(20, 91)], [x / 100 for x in range(20, 101, 2)]
    link = CONSTANTS.link_efficiency  # set, not fitted (module docstring of plan_time)
    hopper = min((Constants(h, CONSTANTS.ampere, s, link) for h in fractions for s in shares), key=lambda c: loss(c, "hopper"))
    return min((Constants(hopper.hopper, a, hopper.attention, link) for a in fractions), key=lambda c: loss(c, "ampere"))


def summary(rs: list[float]) -> dict[str, tuple[int, float, float]]:
    """Per group (fitted, held out, each system): (rows, median |error|, max |error|), errors as |ratio - 1|."""
    groups: dict[str, list[float]] = {"fitted": [], "held out": []}
    for r, ratio in zip(ROWS, rs):
        err = abs(ratio - 1)
        groups["fitted" if r.fit else "held out"].append(err)
        if not r.fit:
            groups.setdefault(f"held out, {r.system}", []).append(err)
    return {k: (len(v), sorted(v)[len(v) // 2], max(v)) for k, v in groups.items() if v}


def table(constants: Constants = CONSTANTS) -> str:
    lines = [f"{constants}", "",
             "| system | run | GPUs | published tokens/s/GPU | predicted | predicted / published | bound | used for |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in ROWS:
        est = predict(r, constants)
        ratio = est.tokens_per_s_gpu / r.published
        lines.append(f"| {r.system} | {r.label} | {r.gpus} {r.gpu.upper()} | {r.published:,.0f} | {est.tokens_per_s_gpu:,.0f} | "
                     f"{ratio:.2f} | {est.bound} | {'fit' if r.fit else 'held out'} |")
    lines += ["", "| rows | n | median error | max error |", "|---|---:|---:|---:|"]
    for group, (n, med, worst) in summary(ratios(constants)).items():
        lines.append(f"| {group} | {n} | {med:.0%} | {worst:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="search the two constants on the fit rows and print the table at them")
    args = ap.parse_args()
    print(table(fit() if args.fit else CONSTANTS))


if __name__ == "__main__":
    main()
