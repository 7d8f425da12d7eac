"""Real 2-process runs on CPU (gloo): DDP and DeepSpeed ZeRO-1/2/3/3+offload against 1 process.

FSDP2 is not here: Accelerate enables FSDP only for GPU process groups, so it
cannot run on this CPU-only machine (the launcher refuses it with a clear message).
"""

from __future__ import annotations

import signal
import time
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from forklaunch import free_port

STEPS = 20


def _common(tiny_bert, out) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}", "model.max_length=32", "model.dropout=0", "data.max_examples=400",
        f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=10", "train.eval_batch_size=6",
        "optim.lr=2e-4", "tracking.report_to=[]", f"output.dir={out}",
    ]


def _losses(run) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run / "log.jsonl").read_text().splitlines() if "train/loss" in line]


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _launch(tiny_bert, out, strategy: str, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "shardtune.cli", "launch", str(ROOT / "configs/quickstart.yaml"), "--strategy", strategy,
        "--gpus", "0", "--processes", "2", "--main-port", str(free_port()), *_common(tiny_bert, out), *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    """One process, micro-batch 8: the run every strategy must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune.cli", "train", str(ROOT / "configs/quickstart.yaml"), *_common(tiny_bert, out),
         "train.batch_size=8", "train.save_every=10"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):
    """2 processes x micro-batch 4 (same global batch) under each strategy, plus 2 x 2 x accumulation 2."""
    out = {}
    for name, strategy, extra in [
        ("cpu", "cpu", ["train.batch_size=4", "train.save_every=10"]),
        ("zero1", "zero1", ["train.batch_size=4"]),
        ("zero2", "zero2", ["train.batch_size=4", "train.save_every=10"]),
        ("zero3", "zero3", ["train.batch_size=4"]),
        ("zero3_offload", "zero3_offload", ["train.batch_size=4"]),
        ("cpu_accum", "cpu", ["train.batch_size=2", "train.grad_accum=2"]),
        ("zero2_accum", "zero2", ["train.batch_size=2", "train.grad_accum=2"]),
    ]:
        out[name] = tmp_path_factory.mktemp(name) / "run"
        _launch(tiny_bert, out[name], strategy, *extra)
    return out


@pytest.mark.parametrize("name", ["cpu", "zero1", "zero2", "zero3", "zero3_offload", "cpu_accum", "zero2_accum"])
def test_per_step_loss_matches_one_process(reference, runs, name):
    ref, got = _losses(reference), _losses(runs[name])
    assert len(ref) == len(got) == STEPS
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst < 1e-5, f"{name}: worst relative loss difference {worst:.2e}"
    assert _metrics(runs[name])["dist/num_processes"] == 2


@pytest.mark.parametrize("name", ["cpu", "zero1", "zero2", "zero3"])
def test_eval_and_test_metrics_equal_one_process(reference, runs, name):
    """Eval is over the whole eval set (every rank's part, padding duplicates dropped), not rank 0's part."""
    ref, got = _metrics(reference), _metrics(runs[name])
    assert got["test/accuracy"] == ref["test/accuracy"]
    assert got["test/loss"] == pytest.approx(ref["test/loss"], rel=1e-4)
    assert got["best/step"] == ref["best/step"]


def test_sharding_is_real(runs):
    """Per-rank live bytes: ZeRO-1/2/3 halve optimizer state; ZeRO-3 also halves parameters."""
    ddp = _metrics(runs["cpu"])
    ddp_opt, ddp_par = ddp["dist/optim_state_bytes"][0], ddp["dist/param_bytes"][0]
    assert ddp["dist/optim_state_bytes"] == [ddp_opt, ddp_opt] and ddp_opt == 2 * ddp_par  # Adam: 2 fp32 moments
    for name in ["zero1", "zero2", "zero3", "zero3_offload"]:
        m = _metrics(runs[name])
        for rank_bytes in m["dist/optim_state_bytes"]:
            assert rank_bytes == pytest.approx(ddp_opt / 2, rel=0.05), name
        expected_params = ddp_par / 2 if name.startswith("zero3") else ddp_par
        for rank_bytes in m["dist/param_bytes"]:
            assert rank_bytes == pytest.approx(expected_params, rel=0.05), name


@pytest.mark.parametrize("name", ["zero3", "cpu"])
def test_exported_model_reproduces_the_sharded_models_test_metrics(runs, name):
    """The HF folder written at the end (ZeRO-3: gathered from shards) gives the same logits as the live model did."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from shardtune.config import load_config
    from shardtune.data.classification import Encoded, load_splits, make_loader
    from shardtune.metrics import classification_metrics

    run = runs[name]
    cfg = load_config(run / "config.yaml")
    splits = load_splits(cfg.data)
    tok = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    label2id = {lab: i for i, lab in enumerate(splits.labels)}
    loader = make_loader(Encoded(splits.test, tok, label2id, cfg.model.max_length), tok, 64, False, 0)
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            labels.append(batch.pop("labels"))
            logits.append(model(**batch).logits)
    m = classification_metrics(torch.cat(logits), torch.cat(labels), len(splits.labels))
    live = _metrics(run)
    assert m["accuracy"] == live["test/accuracy"]
    assert m["loss"] == pytest.approx(live["test/loss"], rel=1e-5)


def test_resume_two_processes_on_one_and_one_on_two(reference, runs, tiny_bert, tmp_path):
    """A DDP checkpoint holds the whole model and optimizer: it resumes on any number of processes."""
    two, one = runs["cpu"], reference
    to_one = tmp_path / "to_one"
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune.cli", "train", str(ROOT / "configs/quickstart.yaml"), *_common(tiny_bert, to_one),
         "train.batch_size=8", f"train.resume={two}/checkpoints/step-00000010"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and "resumed from step-00000010 at step 10" in proc.stdout, proc.stderr[-3000:]
    to_two = tmp_path / "to_two"
    _launch(tiny_bert, to_two, "cpu", "train.batch_size=4", f"train.resume={one}/checkpoints/step-00000010")
    for resumed, original in [(to_one, two), (to_two, one)]:
        got, want = _losses(resumed), _losses(original)[10:]
        assert len(got) == 10  # steps 11..20: continued, not restarted
        assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 1e-5


def test_zero_checkpoint_on_another_world_size_keeps_the_model(runs, tiny_bert, tmp_path):
    """ZeRO shards of 2 ranks into 1 process: the weights are consolidated, so the next step's loss (computed before
    any update) equals the 2-process run's; the optimizer state starts fresh, and the run says so."""
    src = runs["zero2"]
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune.cli", "train", str(ROOT / "configs/quickstart.yaml"), *_common(tiny_bert, tmp_path / "one"),
         "train.batch_size=8", f"train.resume={src}/checkpoints/step-00000010"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000010 at step 10" in proc.stdout and "optimizer state and RNG states start fresh" in proc.stderr
    got, want = _losses(tmp_path / "one"), _losses(src)
    assert len(got) == 10 and abs(got[0] - want[10]) / want[10] < 1e-5


@pytest.mark.parametrize("strategy", ["zero3", "cpu"])
def test_shardtune_export_of_a_checkpoint_gives_the_live_models_logits(strategy, tiny_bert, tmp_path):
    """ZeRO-3 shards (DeepSpeed consolidation) and a DDP checkpoint both export to a folder that plain from_pretrained loads."""
    import torch
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    _launch(tiny_bert, run, strategy, "train.batch_size=4", "train.max_steps=6", "train.save_every=6", "train.eval_every=null")
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune.cli", "export", str(run / "checkpoints/step-00000006"), "--out", str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    live = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()  # written from the live (sharded) model
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, exported.config.vocab_size, (3, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, live(input_ids=x).logits, rtol=0, atol=1e-6)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "label_map.json").is_file()


def test_each_rank_sees_disjoint_data_and_together_all_of_it(tiny_bert, tmp_path):
    data = tmp_path / "docs.csv"
    data.write_text("text,label\n" + "".join(f"document {i},{'ab'[i % 2]}\n" for i in range(100)))
    out = tmp_path / "seen.json"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "dist_worker.py"), str(ROOT / "configs/quickstart.yaml"), str(out),
        f"model.name_or_path={tiny_bert}", f"data.train_file={data}", "data.validation_fraction=0", "data.test_fraction=0",
        "train.batch_size=4", "train.epochs=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["world"] == 2 and len(seen["steps"]) == 13  # ceil(100 / (2 x 4))
    everything = []
    for step, (rank0, rank1) in enumerate(seen["steps"]):
        if step < 12:
            assert not set(rank0) & set(rank1), step
        everything += rank0 + rank1
    assert set(everything) == {f"document {i}" for i in range(100)}
    assert len(everything) == 104  # the uneven tail: 4 examples padded in (even batches), nothing else twice


def test_stream_resume_on_two_processes_with_workers_is_exact(tiny_lm_tokenizer, lm_corpus, tmp_path):
    """Causal LM on 2 processes x 2 DataLoader workers: resuming from a mid-run checkpoint replays nothing and skips
    nothing, so every later step's loss equals the uninterrupted run's exactly."""
    from conftest import lm_overrides

    cfg = tmp_path / "lm.yaml"
    cfg.write_text("task: causal_lm\n")

    def launch(out, *extra):
        over = lm_overrides(tiny_lm_tokenizer, lm_corpus, out, **{"train.max_steps": 12, "train.save_every": 4,
                                                                   "train.save_total_limit": 3, "data.num_workers": 2})
        cmd = [sys.executable, "-m", "shardtune.cli", "launch", str(cfg), "--strategy", "cpu", "--gpus", "0", "--processes", "2",
               "--main-port", str(free_port()), *over, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(full)
    out = launch(resumed, f"train.resume={full}/checkpoints/step-00000004")
    assert "resumed from step-00000004 at step 4" in out
    assert _losses(resumed) == _losses(full)[4:]  # steps 5..12, bit for bit


@pytest.mark.parametrize("name, strategy", [("cpu", "cpu"), ("zero2", "zero2"), ("zero3", "zero3")])
def test_plan_predicts_the_measured_model_state_bytes(runs, name, strategy):
    """`shardtune plan`'s model-state arithmetic against live per-rank bytes of real 2-process runs (fp32)."""
    from transformers import AutoModelForSequenceClassification

    from shardtune.plan import model_state_bytes

    psi = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(runs[name] / "model").parameters())
    want = model_state_bytes(psi, strategy, 2, "no")
    m = _metrics(runs[name])
    for rank in range(2):
        assert m["dist/param_bytes"][rank] == pytest.approx(want["params"], rel=0.05)
        assert m["dist/optim_state_bytes"][rank] == pytest.approx(want["optim"], rel=0.05)


def test_a_signal_to_one_rank_stops_both_at_the_same_step(tiny_bert, tmp_path):
    """SIGUSR1 reaches rank 1 only: both ranks agree, save one checkpoint at the same step and exit 0."""
    import psutil

    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "shardtune.cli", "launch", str(ROOT / "configs/quickstart.yaml"), "--strategy", "cpu", "--gpus", "0",
        "--processes", "2", "--main-port", str(free_port()), *_common(tiny_bert, run), "train.batch_size=4", "train.max_steps=200",
        "train.eval_every=null",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 5):
        time.sleep(0.1)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "shardtune.cli" in " ".join(p.cmdline()) and "train" in p.cmdline()]
    rank1 = [p for p in ranks if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1, [p.cmdline() for p in ranks]
    rank1[0].send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and "preempted (signal on another rank)" in out  # rank 0 never got the signal itself
    step = int(saved[0].split("-")[1])
    assert f"at step {step}: checkpoint saved" in out and step < 200
