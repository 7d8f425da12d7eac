"""The strategy matrix on 2 CPU ranks (gloo): cpu (DDP), zero1, zero2, zero3, zero3_offload and fsdp (FSDP2) against
one process, over whole runs, with the effects that hide bugs switched on; and resume on 2 -> 2, 2 -> 1, 1 -> 2.

Every run: a tiny BERT (dropout 0, so equality is meaningful), 101 real Rotten Tomatoes training examples, so
an epoch is 12 full steps of 8 and a 13th of 5 (an uneven last batch: 2 ranks x 4 get 4 + 1 and 3 padding
rows), 22 optimizer steps across that boundary, weight decay 0.5 (large, so a strategy that silently drops it
cannot match), clipping at 1.0, lr 1e-3, token counts varying per micro-batch (dynamic padding).

Tolerance: 2e-5 relative on every step's loss and grad norm, for every strategy. All of them run fp32; what
differs is only the order of the floating-point sums (gloo's all-reduce, ZeRO's bucketed reduce-scatter, FSDP2's
reduce-scatter, DeepSpeed's fp32 master copy), which moves the sixth or seventh significant digit (measured:
<= 1.1e-7 on losses, <= 1.1e-6 on grad norms).
"""

from __future__ import annotations

import json

import pytest

import forklaunch
from conftest import ROOT

QS = ROOT / "configs" / "quickstart.yaml"
STEPS, SAVE = 22, 11  # save_total_limit 2 keeps both checkpoints
TOL = 2e-5
STRATEGIES = ["cpu", "zero1", "zero2", "zero3", "zero3_offload", "fsdp"]


def _argv(tiny_bert, out, **extra) -> list[str]:
    over = {
        "model.name_or_path": tiny_bert, "model.max_length": 32, "model.dropout": 0, "data.max_examples": 127,
        "train.max_steps": STEPS, "train.log_every": 1, "train.eval_every": None, "train.eval_batch_size": 6,
        "train.batch_size": 8, "optim.lr": 1e-3, "optim.weight_decay": 0.5, "optim.warmup_steps": 2,
        # synchronous saves: a kill one step after a save must find that checkpoint (an async one seals when written)
        "train.async_save": "false", "tracking.report_to": "[]", "output.dir": out, **extra,
    }
    return ["train", str(QS), *[f"{k}={v}" for k, v in over.items()]]


def _run(argv, logs, world: int, failpoints: str = "") -> None:
    logs.mkdir(parents=True, exist_ok=True)
    codes = forklaunch.launch(argv, logs, world=world, env={"SHARDTUNE_FAILPOINTS": failpoints})
    ok = -9 in codes if failpoints else codes == [0] * world
    assert ok, (codes, (logs / "rank0.log").read_text()[-3000:])


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _curve(run) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["train/loss"], r["train/grad_norm"]) for r in _rows(run) if "train/loss" in r}


def _close(got: dict, want: dict, steps) -> float:
    """Worst relative difference of loss and grad norm over `steps` (every one must be there)."""
    assert set(steps) <= set(got), sorted(set(steps) - set(got))
    return max(abs(a - b) / abs(b) for s in steps for a, b in zip(got[s], want[s]))


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    """One process, plain (no sharding), micro-batch 8; and the same with weight decay 0."""
    out = tmp_path_factory.mktemp("ref")
    _run(_argv(tiny_bert, out / "run", **{"train.save_every": SAVE}), out, world=1)
    _run(_argv(tiny_bert, out / "nodecay", **{"optim.weight_decay": 0.0}), out, world=1)
    return out


TWO = {"train.batch_size": 2, "train.grad_accum": 2}  # 2 ranks x (2 x 2): the global batch of 8, over micro-batches too


@pytest.fixture(scope="module", params=STRATEGIES)
def matrix(request, tiny_bert, tmp_path_factory):
    """Strategy S: 2 ranks x (2 x 2) (the whole run, checkpoint at step 11); 1 process x 8 to step 11 (killed after
    its save); then resumes of step 11 on 2 -> 2 (as the run), 2 -> 1 (1 x 8) and 1 -> 2 (2 ranks x 4)."""
    name, out = request.param, tmp_path_factory.mktemp(request.param)
    s = {"dist.strategy": name}
    _run(_argv(tiny_bert, out / "two", **s, **TWO, **{"train.save_every": SAVE}), out / "logs-two", world=2)
    _run(_argv(tiny_bert, out / "one", **s, **{"train.save_every": SAVE}), out / "logs-one", world=1, failpoints=f"kill@step={SAVE + 1}")
    ckpt = f"step-{SAVE:08d}"
    resumed = {}
    for label, src, world, batch in [("2to2", "two", 2, TWO), ("2to1", "two", 1, {}), ("1to2", "one", 2, {"train.batch_size": 4})]:
        resumed[label] = out / label
        _run(_argv(tiny_bert, resumed[label], **s, **batch, **{"train.resume": out / src / "checkpoints" / ckpt}),
             out / f"logs-{label}", world=world)
    return name, out, resumed


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_decay_is_visible_in_the_reference(reference):
    """Weight decay 0.5 moves the run far beyond the tolerance: a strategy without decay cannot pass the matrix."""
    assert _close(_curve(reference / "nodecay"), _curve(reference / "run"), range(3, STEPS + 1)) > 100 * TOL


def test_every_step_matches_one_process(reference, matrix):
    name, out, _ = matrix
    assert _close(_curve(out / "two"), _curve(reference / "run"), range(1, STEPS + 1)) < TOL, name
    got, want = _metrics(out / "two"), _metrics(reference / "run")  # held-out metrics: every rank's share, padding nowhere
    assert got["test/accuracy"] == want["test/accuracy"] and got["test/loss"] == pytest.approx(want["test/loss"], rel=TOL)


@pytest.mark.parametrize("label", ["2to2", "2to1", "1to2"])
def test_resume_continues_the_run_with_the_optimizer_state(reference, matrix, label):
    name, out, resumed = matrix
    run = resumed[label]
    assert _close(_curve(run), _curve(reference / "run"), range(SAVE + 1, STEPS + 1)) < TOL, (name, label)
    assert min(_curve(run)) == SAVE + 1  # continued, not restarted
    restored = next(r["resume/optim_state_norm"] for r in _rows(run) if "resume/optim_state_norm" in r)
    assert restored > 0, (name, label)  # Adam's moments came back (a fresh optimizer has none)
    if label == "2to2":  # the same layout resumes bit for bit
        want = _curve(out / "two")
        assert {s: v for s, v in _curve(run).items()} == {s: want[s] for s in range(SAVE + 1, STEPS + 1)}, name


def test_per_rank_bytes_are_what_the_strategy_shards_and_what_plan_predicts(matrix, reference):
    """Live per-rank bytes of parameters, gradients (the most held after any micro-batch) and Adam state against
    `shardtune plan`'s arithmetic (fp32, 2 ranks): each strategy is told apart by what it does, ZeRO-1 from ZeRO-2 by
    the whole gradients it keeps while accumulating, ZeRO-2 from ZeRO-3 by its whole parameters."""
    from transformers import AutoModelForSequenceClassification

    from shardtune.plan import model_state_bytes

    name, out, _ = matrix
    psi = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(out / "two" / "model").parameters())
    want = model_state_bytes(psi, name, 2, "no")
    m = _metrics(out / "two")
    for key, plan_key in [("param_bytes", "params"), ("grad_bytes", "grads"), ("optim_state_bytes", "optim")]:
        for rank in range(2):
            assert m[f"dist/{key}"][rank] == pytest.approx(want[plan_key], rel=0.01), (name, key, rank)
    ddp = model_state_bytes(psi, "cpu", 2, "no")
    assert name == "cpu" or want["optim"] == ddp["optim"] / 2  # every sharding strategy halves Adam's state
    assert m["dist/strategy"] == name and m["dist/num_processes"] == 2


def test_export_of_a_checkpoint_gives_the_live_models_logits(matrix, tmp_path):
    """`shardtune export` of the last checkpoint (DCP shards, or ZeRO shards) == RUN/model, which the end of the run
    wrote from the live (sharded) model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from shardtune.export import export_checkpoint

    name, out, _ = matrix
    export_checkpoint(out / "two" / "checkpoints" / f"step-{STEPS:08d}", tmp_path / "hf")
    live = AutoModelForSequenceClassification.from_pretrained(out / "two" / "model").eval()
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, exported.config.vocab_size, (3, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, live(input_ids=x).logits, rtol=0, atol=1e-6)
