"""Chunked vs full-logits causal-LM loss: peak memory and tokens/s of one SmolLM2-135M training step on this CPU.

The packaged SmolLM2-135M (`packaged_model("smollm2-135m")`, fp32, tied
embeddings, 49,152-word vocabulary), one micro-batch of B x T tokens of real
text (the Python 3.11 docs, concatenated with EOS, cut into rows), trained
with fused AdamW (lr 1e-5) for `--steps` optimizer steps per arm:

  plain    `model(input_ids, labels=labels).loss` (HF's ForCausalLMLoss over the
           full B x T x V fp32 logits), backward, AdamW step
  chunked  `shardtune.losses.install_chunked_head(model)`; the loss sum from
           `head.loss_for(labels)` over `--chunk-tokens` tokens at a time,
           divided by the token count, backward, AdamW step; under bf16, with
           shardtune's autocast settings (`distributed.base.autocast_kwargs`: no
           cast cache), where plain and trainer keep torch's default
  plain-nocache  (with --arms) plain under shardtune's autocast settings: what
           the cast cache alone accounts for
  trainer  `transformers.Trainer` on the same rows (its compute_loss:
           `model(**inputs, num_items_in_batch=...)`, the same full logits),
           its default optimizer (adamw_torch_fused), no eval/saving/logging

Each arm runs in a fresh subprocess (`--child ARM`), so its peak memory is the
process's own `ru_maxrss` (peak resident set, from getrusage): the model load
(the same in every arm) and the step together. Each arm runs with
MALLOC_MMAP_THRESHOLD_=131072 (`--malloc-mmap-threshold`): glibc then serves every
allocation over 128 KiB with its own mmap and returns it to the OS when freed, so
the peak resident set follows the peak of live memory. With glibc's default
(`--malloc-mmap-threshold 0`) the threshold grows after large frees and freed
buffers stay resident: the chunked arm's many chunk-sized buffers then showed up
as 1.4 GiB more peak RSS than it ever held live (measured, docs/benchmarks.md). "step peak" subtracts the
resident set right after loading (VmRSS), which is what the loss changes. Step
time comes from a global optimizer step post-hook (the same for every arm):
the first step (allocation of the optimizer state, first-call costs) is
excluded when `--steps` > 1. Arms alternate in rotated order over `--rounds`;
the table gives medians. The first step's loss is printed per arm: plain,
chunked and trainer must agree (same weights, same tokens) to about 1e-5: PyTorch's CPU
log_softmax, which the full-logits loss uses, sums the 49,152 exponentials in fp32
with a bias of about -2.5e-6 in the log-normalizer, while the chunked loss's
logsumexp agrees with an fp64 evaluation (see docs/benchmarks.md).
`--gradient-checkpointing` recomputes each decoder layer in backward in every arm:
the layer activations then no longer hide what the logits cost.

Run: .venv/bin/python bench/chunked_loss.py   (about 5 minutes on the 2-core CPU at 2 x 2048, --steps 2)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
LR = 1e-5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="plain,chunked,trainer")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per arm; all but the first are timed")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: shardtune.losses.default_chunk_tokens")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward (all arms)")
    p.add_argument("--precision", choices=("no", "bf16"), default="no",
                   help="bf16: every arm's forward under bf16 autocast (the Trainer's bf16=True), fp32 weights and AdamW")
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                   help="MALLOC_MMAP_THRESHOLD_ for each arm (bytes); 0 leaves glibc's dynamic default")
    p.add_argument("--peak-budget", type=float, default=3.0, help="seconds per dtype for the matmul peak (0: no roofline column)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def write_rows(model_dir: Path, batch: int, seq: int, out: Path) -> None:
    """B x T token ids of the docs in sorted path order, documents joined by EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for path in sorted(DOCS.rglob("*.rst.txt")):
        ids += tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= batch * seq:
            break
    torch.save(torch.tensor(ids[: batch * seq]).view(batch, seq), out)


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(a) -> None:
    """One arm in this fresh process; writes {"losses", "step_s", "peak", "after_load"} to --out."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import AutoModelForCausalLM

    from shardtune.assets import packaged_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(packaged_model("smollm2-135m"), dtype=torch.float32).train()
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    ids = torch.load(a.data)
    after_load = rss_now()
    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    losses = trainer_arm(a, model, ids) if a.child == "trainer" else loop_arm(a, model, ids)
    times = [t - s for s, t in zip([start] + stamps[:-1], stamps)]
    result = {"losses": losses, "step_s": times, "peak": peak_rss(), "after_load": after_load, "tokens": ids.numel()}
    Path(a.out).write_text(json.dumps(result))


def loop_arm(a, model, ids) -> list[float]:
    from shardtune.distributed.base import autocast_kwargs
    from shardtune.losses import install_chunked_head

    head = install_chunked_head(model, a.chunk_tokens) if a.child == "chunked" else None
    # shardtune's autocast (no cast cache) in its own arm and in plain-nocache; torch's default in plain
    cast = autocast_kwargs().to_kwargs() if a.child in ("chunked", "plain-nocache") else {}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    losses = []
    for _ in range(a.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16", **cast):
            if head is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                with head.loss_for(ids) as lm:
                    out = model(input_ids=ids)
                loss_sum, tokens = lm.result(out)
                loss = loss_sum / tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del loss
    return losses


def trainer_arm(a, model, ids) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    rows = [{"input_ids": r, "labels": r} for r in ids]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, report_to="none", per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=LR,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
            eval_strategy="no", dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, bf16=a.precision == "bf16",
        )
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Losses()]).train()
    return losses


def run_arm(a, arm: str, data: Path, tmp: Path, r: int) -> dict:
    out = tmp / f"{arm}-{r}.json"
    cmd = [sys.executable, __file__, "--child", arm, "--data", str(data), "--out", str(out), "--steps", str(a.steps),
           "--threads", str(a.threads), "--batch", str(a.batch), "--seq", str(a.seq), "--precision", a.precision]
    if a.chunk_tokens:
        cmd += ["--chunk-tokens", str(a.chunk_tokens)]
    if a.gradient_checkpointing:
        cmd += ["--gradient-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    if a.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    a = parse_args()
    if a.child:
        child(a)
        return 0
    from shardtune.assets import packaged_model

    arms = [x for x in a.arms.split(",") if x]
    load = [os.getloadavg()[0]]
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="shardtune-bench-") as tmp:
        data = Path(tmp) / "rows.pt"
        write_rows(packaged_model("smollm2-135m"), a.batch, a.seq, data)
        for r in range(a.rounds):
            for arm in arms[r % len(arms):] + arms[: r % len(arms)]:
                res = run_arm(a, arm, data, Path(tmp), r)
                results[arm].append(res)
                print(f"round {r + 1} {arm:8s} peak {res['peak'] / 2**20:7.0f} MiB, after load {res['after_load'] / 2**20:6.0f} MiB, "
                      f"steps {', '.join(f'{t:.1f}' for t in res['step_s'])} s, losses {res['losses']}, load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    print_table(a, results, load, roofline(a))
    return 0


def roofline(a) -> tuple[float, float]:
    """(model training FLOPs of one B x T step, the measured matmul peak FLOP/s of the arms' dtype at --threads); the
    peak is measured after the arms, alone on the machine (0 when --peak-budget is 0)."""
    from transformers import AutoConfig

    from shardtune.assets import packaged_model
    from shardtune.flops import config_flops_per_token
    from shardtune.hardware import matmul_peak_flops

    step_flops = a.batch * a.seq * config_flops_per_token(AutoConfig.from_pretrained(packaged_model("smollm2-135m")), a.seq)
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    return step_flops, matmul_peak_flops(dtype, "cpu", budget_s=a.peak_budget) if a.peak_budget else 0.0


def print_table(a, results: dict[str, list[dict]], load: list[float], roof: tuple[float, float]) -> None:
    def med(arm, fn):
        return statistics.median(fn(r) for r in results[arm])

    peak = {arm: med(arm, lambda r: r["peak"]) for arm in results}
    step_peak = {arm: med(arm, lambda r: r["peak"] - r["after_load"]) for arm in results}
    tps = {arm: med(arm, lambda r: r["tokens"] / statistics.median(r["step_s"][1:] or r["step_s"])) for arm in results}
    base = "plain" if "plain" in results else next(iter(results))
    ckpt = ", gradient checkpointing" if a.gradient_checkpointing else ""
    ckpt += f", MALLOC_MMAP_THRESHOLD_={a.malloc_mmap_threshold}" if a.malloc_mmap_threshold else ", glibc malloc defaults"
    step_flops, peak_flops = roof
    dtype = "bf16 autocast" if a.precision == "bf16" else "fp32"
    print(f"\nSmolLM2-135M, {a.batch} x {a.seq} tokens, {dtype}{ckpt}, {a.threads} thread(s), {a.steps} step(s) per arm "
          f"({'first excluded' if a.steps > 1 else 'one step, timed'}), {a.rounds} round(s), load {load[0]:.1f} -> {load[1]:.1f}; "
          f"{step_flops / 1e12:.2f} model TFLOP per step, measured {dtype.split()[0]} matmul peak {peak_flops / 1e9:.1f} GFLOP/s")
    print(f"| arm | peak RSS MiB | vs {base} | step peak MiB (peak - after load) | vs {base} | tokens/s | vs {base} | "
          "model GFLOP/s | of the peak | first-step loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm in results:
        loss, rate = results[arm][0]["losses"][0], tps[arm] * step_flops / (a.batch * a.seq)
        print(f"| {arm} | {peak[arm] / 2**20:.0f} | {peak[arm] / peak[base]:.2f}x | {step_peak[arm] / 2**20:.0f} | "
              f"{step_peak[arm] / step_peak[base]:.2f}x | {tps[arm]:.1f} | {tps[arm] / tps[base]:.2f}x | {rate / 1e9:.1f} | "
              f"{rate / peak_flops if peak_flops else float('nan'):.2f} | {loss:.5f} |")


if __name__ == "__main__":
    sys.exit(main())
