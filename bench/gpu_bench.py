"""GPU benchmark (issue 7): tokens/s, MFU and peak memory on one NVIDIA GPU, measured against `shardtune plan`.

Run it with `bash bench/gpu.sh` on a machine with an NVIDIA GPU (the script installs the carried
wheels, checks nvidia-smi and runs this file). `--cpu-check` builds every config, runs the plan for
each and prints the plans and the result table's rows without touching CUDA (tests/test_gpu_bench.py).

Models (random weights: throughput does not depend on them), all with SmolLM2's 49,152-id vocabulary
except MiniLM:
  smollm2-135m  LlamaConfig of SmolLM2-135M's shape (hidden 576, MLP 1536, 30 layers, 9 heads, 3 KV
                heads, tied embeddings; 134,515,008 parameters), sequence 2048
  llama-1b      shardtune.models.PRESETS["1b"] (TinyLlama shape, untied head), sequence 2048
  minilm-l6     BertConfig of all-MiniLM-L6-v2's shape (hidden 384, 6 layers, 12 heads, MLP 1536,
                vocab 30522), sequence classification with 2 labels, sequence 128, batch 32
The tokenizer is a WordLevel tokenizer of exactly 49,152 ids (4 specials, words t4..t49151); the data
for shardtune's own loop is a JSONL of uniformly random words, one token each.

Arms, each in its own process, so that a crash, an OOM or a timeout fails one row and the rest goes on:
  loop    a tight loop written here, per model x {eager, ckpt, compile, compile+ckpt}. fp32 weights
          with bf16 autocast (what Accelerate's mixed_precision=bf16 does on shardtune's single_gpu/DDP
          path, so the plan's single_gpu row applies), fused AdamW over shardtune's parameter groups,
          grad clipping at 1.0, zero_grad(set_to_none), random token batches already on the GPU,
          use_cache=False. `compile` is regional: `layer.compile()` on every decoder/encoder layer (one
          graph, reused by all layers: seconds of compilation rather than minutes for the whole model).
          `ckpt` wraps each layer's forward in torch.utils.checkpoint (non-reentrant), inside the
          compiled region when compiled. Timing: the warmup steps (compilation included) are untimed;
          torch.cuda.synchronize(), the timed steps, synchronize. Peak memory: max_memory_allocated /
          max_memory_reserved over the variant, counted from the allocation before the model was built.
  launch  `shardtune launch CONFIG --strategy {single_gpu,zero2,zero3,fsdp} --gpus 1` on the 1B model, no
          checkpointing, the loop arm's micro-batch; throughput, step time and (where the loop logs
          them) memory/peak_* and train/mfu come from RUN/log.jsonl, medians over the steps after warmup.
  train   `shardtune train` (one process, no launcher) on the SmolLM2 shape, eager, no checkpointing:
          shardtune's whole loop (streamed data included) against the plain loop's same configuration.
The launch and train arms also record the GPU's memory.used peak from nvidia-smi (CUDA context and
the allocator's cache included), since shardtune's log may not hold peak memory.

MFU = tokens/s x shardtune.flops.model_flops_per_token (6N + 12LHQT, PaLM appendix B) / the GPU's dense
bf16 peak (shardtune.flops.peak_flops); recomputation under checkpointing is not counted as useful work.
`plan GiB` is the `total` of plan.plan(cfg, gpus=1, GPU memory)'s row for the arm's strategy and
checkpointing, `meas/plan` the measured peak allocated over it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
if "--cpu-check" in sys.argv:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # belt and braces: the check must not reach a GPU

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
VOCAB = 49152
DEVICE = "cuda"  # the worker's device; a CPU smoke run of the worker code may patch it
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512, num_labels=2)
MODELS = {  # key -> (config file, micro-batch, sequence)
    "smollm2-135m": ("lm-smollm2.yaml", 16, 2048),
    "llama-1b": ("lm-1b.yaml", 8, 2048),
    "minilm-l6": ("cls-minilm.yaml", 32, 128),
}
VARIANTS = ("eager", "ckpt", "compile", "compile+ckpt")
STRATEGIES = ("single_gpu", "zero2", "zero3", "fsdp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-check", action="store_true", help="build configs, plan them, print the rows; no CUDA")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=True, help="few steps (default); --no-quick: 3x more")
    p.add_argument("--arms", default="loop,launch,compile,train", help="groups to run: loop (eager/ckpt + MiniLM), launch, compile, train")
    p.add_argument("--budget", type=float, default=420, help="seconds for all arms together; arms that would start later are skipped")
    p.add_argument("--variant-timeout", type=float, default=120, help="seconds per plain-loop variant (compilation included)")
    p.add_argument("--launch-timeout", type=float, default=150, help="seconds per shardtune launch/train arm")
    p.add_argument("--gpu-name", default="NVIDIA H200", help="GPU for --cpu-check's MFU peak (default: the H200)")
    p.add_argument("--gpu-memory", default="143771MiB", help="GPU memory for --cpu-check's plan (default: the H200's)")
    p.add_argument("--workdir", type=Path, help="where models, data and runs go (default: a fresh temp folder)")
    p.add_argument("--out", type=Path, help="write results.json, table.md and logs.txt here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run plain-loop variants of one model
    p.add_argument("--variants", help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if set(a.arms.split(",")) - {"loop", "launch", "compile", "train"}:
        p.error(f"--arms {a.arms!r}: choose from loop, launch, compile, train (comma-separated)")
    a.steps, a.warmup = (10, 3) if a.quick else (30, 5)
    a.max_steps = a.steps + 5  # shardtune runs: the first 5 logged steps are warmup
    return a


# ---------------------------------------------------------------- workspace: tokenizer, model folders, data, configs


def build_workspace(root: Path, a) -> dict[str, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, LlamaConfig, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {**{s: i for i, s in enumerate(specials)}, **{f"t{i}": i for i in range(len(specials), VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  model_max_length=1_000_000)
    assert len(tok) == VOCAB
    dirs = {"tok": root / "tokenizer", "smollm2-135m": root / "smollm2-135m", "minilm-l6": root / "minilm-l6"}
    tok.save_pretrained(dirs["tok"])
    tok.save_pretrained(dirs["smollm2-135m"])
    LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **SMOLLM2).save_pretrained(dirs["smollm2-135m"])
    BertConfig(**MINILM).save_pretrained(dirs["minilm-l6"])
    data = root / "data.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:  # ~1.2M tokens: more than any arm reads (the stream repeats anyway)
        for _ in range(4 if a.cpu_check else 400):
            words = rng.choices(range(len(specials), VOCAB), k=rng.randint(1000, 5000))
            f.write(json.dumps({"text": " ".join(f"t{w}" for w in words)}) + "\n")
    lm = lambda model, batch: {  # noqa: E731
        "task": "causal_lm",
        "model": {**model, "init": "scratch", "max_length": 2048, "gradient_checkpointing": False},
        "data": {"sources": [{"path": str(data)}], "seq_len": 2048, "on_source_end": "repeat", "num_workers": 2},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "train": {"max_steps": a.max_steps, "batch_size": batch, "mixed_precision": "bf16", "log_every": 1,
                  "metric_for_best": "eval/loss", "progress_bar": "off"},
        "tracking": {"report_to": []},
        "dist": {"timeout_minutes": 10},
    }
    configs = {
        "lm-1b.yaml": lm({"name_or_path": str(dirs["tok"]), "preset": "1b"}, MODELS["llama-1b"][1]),
        "lm-smollm2.yaml": lm({"name_or_path": str(dirs["smollm2-135m"])}, MODELS["smollm2-135m"][1]),
        "cls-minilm.yaml": {
            "task": "classification",
            "model": {"name_or_path": str(dirs["minilm-l6"]), "max_length": MODELS["minilm-l6"][2]},
            "data": {"labels": ["0", "1"]},
            "train": {"batch_size": MODELS["minilm-l6"][1], "mixed_precision": "bf16"},
            "tracking": {"report_to": []},
        },
    }
    for name, cfg in configs.items():
        (root / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {**dirs, "data": data, "root": root}


def load_cfg(root: Path, model: str, ckpt: bool = False):
    from shardtune.config import load_config

    return load_config(root / MODELS[model][0], [f"model.gradient_checkpointing={str(ckpt).lower()}"])


def meta_model(root: Path, model: str):
    """The model the config builds, on the meta device, for FLOPs per token."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from shardtune.models import load_causal_lm, load_tokenizer

    cfg = load_cfg(root, model)
    with torch.device("meta"):
        if cfg.task == "causal_lm":
            return load_causal_lm(cfg.model, load_tokenizer(cfg.model))
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path))


def plans(root: Path, gpu_memory: int, gpu_name: str) -> dict:
    """{(model, ckpt): Plan} for one GPU of this type (memory, and the step time plan_time predicts); the model's
    shape is read once per model."""
    from shardtune import ShardtuneError
    from shardtune.plan import model_shape, plan
    from shardtune.plan_time import GPUS, Cluster, gpu_spec

    try:
        spec = gpu_spec(gpu_name)
    except ShardtuneError:
        spec = GPUS["h100"]  # a GPU the planner has no row for: its step times are an H100's
    out = {}
    for model in MODELS:
        shape = model_shape(load_cfg(root, model))
        for ckpt in (False, True):
            out[model, ckpt] = plan(load_cfg(root, model, ckpt), 1, gpu_memory, shape=shape, cluster=Cluster(spec, 1, 1))
    return out


def predicted(plans_: dict, model: str, ckpt: bool) -> float | None:
    """The planner's tokens/s on this one GPU (plan_time: the same for every strategy without a second rank)."""
    rows = [r for r in plans_[model, ckpt].meshes if r.estimate]
    return rows[0].estimate.tokens_per_s_gpu if rows else None


def planned(plans_: dict, model: str, strategy: str, ckpt: bool) -> float:
    row = next(r for r in plans_[model, ckpt].rows if r.strategy == ("ddp" if strategy == "single_gpu" else strategy))
    return row.total / GIB


# ---------------------------------------------------------------- the arms: what runs, in which order


def arm_list(a) -> list[dict]:
    """Every row of the table, in table order; `job` groups rows that run in one process, `order` runs jobs."""
    groups = set(a.arms.split(","))
    arms = []
    for model in MODELS:
        for v in (("eager",) if model == "minilm-l6" else VARIANTS):
            group = "compile" if v.startswith("compile") else "loop"
            job = f"loop:{model}:{'compile' if group == 'compile' else 'plain'}"
            arms.append(dict(name=f"loop {v}", model=model, kind="loop", variant=v, strategy="single_gpu",
                             ckpt="ckpt" in v, job=job, order=(0 if group == "loop" else 2), run=group in groups))
    for s in STRATEGIES:
        arms.append(dict(name=f"launch {s}", model="llama-1b", kind="launch", variant=s, strategy=s, ckpt=False,
                         job=f"launch:{s}", order=1, run="launch" in groups))
    arms.append(dict(name="shardtune train", model="smollm2-135m", kind="train", variant="eager", strategy="single_gpu",
                     ckpt=False, job="train", order=3, run="train" in groups))
    return arms


# ---------------------------------------------------------------- worker: the plain loop (child process, CUDA)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("variant timed out")


def _layers(model):
    base = getattr(model, model.base_model_prefix)
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def _checkpointed(layer) -> None:
    from torch.utils.checkpoint import checkpoint

    forward = layer.forward

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = run


def loop_variant(root: Path, model_key: str, variant: str, a) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from shardtune.flops import model_flops_per_token, peak_flops
    from shardtune.models import load_causal_lm, load_tokenizer
    from shardtune.optim import param_groups

    _, batch, seq = MODELS[model_key]
    cfg = load_cfg(root, model_key)
    torch.manual_seed(0)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    causal = cfg.task == "causal_lm"
    with torch.device(DEVICE):
        if causal:
            model = load_causal_lm(cfg.model, load_tokenizer(cfg.model))
        else:
            model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path))
    model.train()
    fpt = model_flops_per_token(model, seq)
    for layer in _layers(model):
        if "ckpt" in variant:
            _checkpointed(layer)
        if variant.startswith("compile"):
            layer.compile()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    xs = [torch.randint(0, vocab, (batch, seq), device=DEVICE) for _ in range(2)]
    ys = [x if causal else torch.randint(0, 2, (batch,), device=DEVICE) for x in xs]
    extra = {"use_cache": False} if causal else {}

    def step(i: int) -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=xs[i % 2], labels=ys[i % 2], **extra).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps, warmup = (a.steps * 5, a.warmup * 2) if not causal else (a.steps, a.warmup)
    t = time.perf_counter()
    step(0)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    for i in range(1, warmup):
        step(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    tps = steps * batch * seq / dt
    peak = peak_flops(torch.cuda.get_device_name(), torch.bfloat16)
    return dict(
        tokens_per_s=tps, samples_per_s=steps * batch / dt, step_ms=1000 * dt / steps, mfu=tps * fpt / peak if peak else None,
        peak_alloc_gib=(torch.cuda.max_memory_allocated() - base) / GIB, peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
        base_gib=base / GIB, first_step_s=first, flops_per_token=fpt, timed_steps=steps, warmup_steps=warmup,
    )


def worker(a) -> int:
    import torch

    root, model_key = a.workdir, a.worker
    signal.signal(signal.SIGALRM, _alarm)
    for variant in a.variants.split(","):
        signal.alarm(int(a.variant_timeout))
        try:
            res = {"status": "ok", **loop_variant(root, model_key, variant, a)}
        except Exception as exc:  # one variant's failure (OOM, compile error, timeout) is a row, not the end
            res = {"status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]}
        finally:
            signal.alarm(0)
        with open(a.results, "a") as f:
            f.write(json.dumps({"model": model_key, "variant": variant, **res}) + "\n")
        print(f"[worker] {model_key} {variant}: {res}", file=sys.stderr, flush=True)
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return 0


# ---------------------------------------------------------------- parent: subprocesses, logs, nvidia-smi


class SmiPeak(threading.Thread):
    """Polls nvidia-smi's memory.used (MiB) of GPU 0 while an arm runs; keeps the peak."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.halt = 0, threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak, int(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self.halt.wait(0.5)

    def stop(self) -> float:
        self.halt.set()
        self.join(5)
        return self.peak / 1024


def run_process(cmd: list[str], log: Path, timeout: float) -> tuple[int, float, float]:
    """(return code or None on timeout, seconds, nvidia-smi peak GiB); the whole process group dies on timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    smi = SmiPeak()
    smi.start()
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t, smi.stop()


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if "Error" in ln or "error:" in ln or "Killed" in ln]
    return (hits or lines or ["no output"])[-1][:160]


def run_loop_job(arms: list[dict], ws: dict, a, deadline: float) -> None:
    """Variants of one model in one child; after a crash, a new child runs the variants left."""
    todo = list(arms)
    model = todo[0]["model"]
    results, log = ws["root"] / f"{todo[0]['job'].replace(':', '-')}.jsonl", ws["root"] / f"{todo[0]['job'].replace(':', '-')}.log"
    while todo:
        left = deadline - time.time()
        if left < 30:
            for x in todo:
                x.update(status="skipped", error="time budget spent")
            return
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--variants", ",".join(x["variant"] for x in todo),
               "--workdir", str(ws["root"]), "--results", str(results), "--variant-timeout", str(a.variant_timeout),
               "--quick" if a.quick else "--no-quick"]
        rc, secs, _ = run_process(cmd, log, min(left, len(todo) * a.variant_timeout + 60))
        done = {}
        if results.exists():
            done = {r["variant"]: r for r in map(json.loads, results.read_text().splitlines())}
        for x in todo:
            if x["variant"] in done:
                x.update(done[x["variant"]])
        rest = [x for x in todo if x["variant"] not in done]
        if rest:  # the first one left is the one that killed the child
            why = "timeout (process killed)" if rc is None else f"process died (rc {rc}): {last_error(log)}"
            rest[0].update(status="error", error=why)
            rest = rest[1:]
        todo = rest
        print(f"[bench] {model} loop job: rc {rc}, {secs:.0f}s", file=sys.stderr, flush=True)


def read_log(run_dir: Path, skip: int) -> dict:
    rows = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "train/tokens_per_s" in r and r.get("step", 0) > skip]
    if not rows:
        raise RuntimeError("log.jsonl has no train/tokens_per_s rows after warmup")
    med = lambda k: statistics.median(r[k] for r in rows) if k in rows[0] else None  # noqa: E731
    peak = lambda k: max(r[k] for r in rows) if k in rows[0] else None  # noqa: E731
    step_s = med("time/step_s")
    return dict(tokens_per_s=med("train/tokens_per_s"), samples_per_s=med("train/samples_per_s"),
                step_ms=1000 * step_s if step_s else None, logged_mfu=med("train/mfu"),
                peak_alloc_gib=peak("memory/peak_allocated_gib"), peak_reserved_gib=peak("memory/peak_reserved_gib"), logged_steps=len(rows))


def run_shardtune_job(arm: dict, ws: dict, a, deadline: float, port: int) -> None:
    import shutil

    left = deadline - time.time()
    if left < 45:
        arm.update(status="skipped", error="time budget spent")
        return
    run_dir = ws["root"] / "runs" / arm["job"].replace(":", "-")
    cfg = str(ws["root"] / MODELS[arm["model"]][0])
    over = [f"output.dir={run_dir}", "output.overwrite=true"]
    if arm["kind"] == "launch":
        cmd = [sys.executable, "-m", "shardtune.cli", "launch", cfg, *over, "--strategy", arm["strategy"], "--gpus", "1",
               "--main-port", str(port)]
    else:
        cmd = [sys.executable, "-m", "shardtune.cli", "train", cfg, *over]
    log = ws["root"] / f"{arm['job'].replace(':', '-')}.log"
    rc, secs, smi = run_process(cmd, log, min(left, a.launch_timeout))
    arm.update(smi_gib=smi, wall_s=secs)
    try:
        arm.update(status="ok" if rc == 0 else "error", **read_log(run_dir, skip=5))
        if rc != 0:
            arm["error"] = "timeout (process killed)" if rc is None else f"rc {rc}: {last_error(log)}"
    except (OSError, RuntimeError, ValueError) as exc:
        why = "timeout (process killed)" if rc is None else f"rc {rc}: {last_error(log)}" if rc else str(exc)
        arm.update(status="error", error=why)
    shutil.rmtree(run_dir / "model", ignore_errors=True)  # GiBs of exported weights nobody reads
    print(f"[bench] {arm['name']}: rc {rc}, {secs:.0f}s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the table


def _f(x, fmt: str) -> str:
    """x formatted, '-' for None; a unit after the format spec ('.1f%', '.2fx') is appended."""
    spec = fmt.rstrip("%x")
    return "-" if x is None else format(x, spec) + fmt[len(spec):]


def table(arms: list[dict], plans_: dict, fpt: dict, peak: float | None) -> str:
    base = {(x["model"], x["variant"]): x.get("tokens_per_s") for x in arms if x["kind"] == "loop"}
    head = ("| model | arm | micro-batch x seq | tokens/s | samples/s | step ms | MFU | vs plain loop | peak alloc GiB "
            "| peak reserved GiB | nvidia-smi GiB | plan GiB (row) | meas/plan | plan tokens/s | meas/plan tokens/s | note |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in arms:
        _, b, s = MODELS[x["model"]]
        tps = x.get("tokens_per_s")
        mfu = x.get("mfu") if x.get("mfu") is not None else (tps * fpt[x["model"]] / peak if tps and peak else None)
        ref = base.get((x["model"], "eager")) if x["kind"] != "loop" else None
        plan_gib, pred = planned(plans_, x["model"], x["strategy"], x["ckpt"]), predicted(plans_, x["model"], x["ckpt"])
        alloc = x.get("peak_alloc_gib")
        notes = [x.get("error") or ("" if x.get("status") == "ok" else x.get("status", ""))]
        if x.get("first_step_s") is not None:
            notes.append(f"first step {x['first_step_s']:.1f}s")
        if x["kind"] != "loop" and x.get("status") == "ok" and alloc is None:
            notes.append("log.jsonl has no memory/peak_allocated_gib")
        note = "; ".join(n for n in notes if n)
        cells = [x["model"], x["name"], f"{b} x {s}", _f(tps, ",.0f"), _f(x.get("samples_per_s"), ",.1f"), _f(x.get("step_ms"), ".0f"),
                 _f(None if mfu is None else 100 * mfu, ".1f%"), _f(tps / ref if tps and ref else None, ".2fx"),
                 _f(alloc, ".2f"), _f(x.get("peak_reserved_gib"), ".2f"), _f(x.get("smi_gib") or None, ".1f"),
                 f"{plan_gib:.2f} ({x['strategy']}{', ckpt' if x['ckpt'] else ''})", _f(alloc / plan_gib if alloc else None, ".2f"),
                 _f(pred, ",.0f"), _f(tps / pred if tps and pred else None, ".2fx"), note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_info() -> tuple[str, int, str]:
    out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    name, mib, driver = (c.strip() for c in out.strip().split(","))
    return name, int(mib) << 20, driver


def main() -> int:
    a = parse_args()
    if a.worker:
        return worker(a)
    import tempfile

    from transformers.utils import logging as hf_logging

    from shardtune.flops import model_flops_per_token, peak_flops
    from shardtune.plan import parse_memory

    hf_logging.set_verbosity_error()
    t0 = time.time()
    name, memory, driver = (a.gpu_name, parse_memory(a.gpu_memory), "-") if a.cpu_check else gpu_info()
    scratch = tempfile.TemporaryDirectory(prefix="shardtune-gpu-bench-") if a.cpu_check and not a.workdir else None
    root = a.workdir or Path(scratch.name if scratch else tempfile.mkdtemp(prefix="shardtune-gpu-bench-"))
    ws = build_workspace(root, a)
    plans_ = plans(root, memory, name)
    fpt = {m: model_flops_per_token(meta_model(root, m), MODELS[m][2]) for m in MODELS}
    peak = peak_flops(name, "bf16")
    print(f"GPU: {name}, {memory / GIB:.1f} GiB, driver {driver}; dense bf16 peak {_f(peak and peak / 1e12, '.0f')} TFLOP/s; "
          f"workdir {root}; steps {a.steps} timed after {a.warmup} warmup (loop), {a.max_steps} with the first 5 untimed (shardtune)")
    for (model, ckpt), p in plans_.items():
        print(f"\n## plan: {model}, gradient checkpointing {'on' if ckpt else 'off'}, "
              f"{fpt[model] / 1e9:.2f} GFLOP per token (training)\n{p.table()}")
    arms = arm_list(a)
    if a.cpu_check:
        import torch

        assert not torch.cuda.is_initialized(), "--cpu-check touched CUDA"
        for x in arms:
            x.update(status="not run (--cpu-check)")
    else:
        deadline, port = t0 + a.budget, 29610
        jobs: dict[str, list[dict]] = {}
        for x in sorted((x for x in arms if x["run"]), key=lambda x: x["order"]):
            jobs.setdefault(x["job"], []).append(x)
        for job, members in jobs.items():
            port += 1
            if job.startswith("loop:"):
                run_loop_job(members, ws, a, deadline)
            else:
                run_shardtune_job(members[0], ws, a, deadline, port)
        for x in arms:
            if not x["run"]:
                x.update(status="not selected (--arms)")
    result = table(arms, plans_, fpt, peak)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps({"gpu": name, "driver": driver, "arms": arms}, indent=1, default=str))
        (a.out / "table.md").write_text(result + "\n")
        logs = [f"===== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-80:]) for p in sorted(root.glob("*.log"))]
        (a.out / "logs.txt").write_text("\n".join(logs) + "\n")
    print(f"\n{len([x for x in arms if x.get('status') == 'ok'])} of {len(arms)} arms ran, {time.time() - t0:.0f}s in all\n")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
