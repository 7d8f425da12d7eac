"""README claims with no test of their own before: a non-finite grad norm skips the step on every rank, hub specs,
W&B's WANDB_MODE over a key, `optim.max_grad_norm: null`, `optim.warmup_ratio`, `data.validation_sources` with
`train.eval_batches`, `train.resume: never`, secrets in what a run writes, LoRA SFT on 2 ranks. In-process runs of
tiny models, two 2-rank launches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import forklaunch
from conftest import ROOT, lm_overrides, tiny_overrides
from test_faults import _rank_state

QS = ROOT / "configs" / "quickstart.yaml"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in _rows(run) if "train/loss" in r]


@pytest.fixture
def lm_run(run_cli, tiny_lm_tokenizer, lm_corpus, tmp_path):
    """`shardtune train` of the tiny from-scratch Llama, in-process, fp32; returns (stdout, run folder) after checking
    the exit code (`expect`); `.err` holds the last run's stderr."""
    yaml = tmp_path / "lm.yaml"
    yaml.write_text("task: causal_lm\n")

    class Run:
        err = ""  # the last run's stderr

        def __call__(self, name: str, expect: int = 0, **extra) -> tuple[str, Path]:
            out = tmp_path / name
            over = lm_overrides(tiny_lm_tokenizer, lm_corpus, out, **{"train.mixed_precision": "no", "data.holdout": 0, **extra})
            code, stdout, self.err = run_cli("train", yaml, *over)
            assert code == expect, self.err[-3000:]
            return stdout, out

    return Run()


# ---------------------------------------------------------------- a non-finite grad norm


def test_an_inf_gradient_with_a_finite_loss_skips_the_step_on_every_rank(tiny_bert, tmp_path):
    """Rank 1's gradient of step 3 gets an Inf after backward (failpoint inf@step=3,rank=1); its loss is finite, so
    only rank 1's grad norm can tell. Rank 0, which logs a finite loss and a finite grad norm for step 3, skips the
    update too: checkpoints 2 and 3 hold the same weights and optimizer state, and step 4 trains again."""
    run = tmp_path / "run"
    over = {"train.max_steps": 4, "train.save_every": 1, "train.save_total_limit": 10, "train.batch_size": 4, "train.log_every": 1,
            "train.eval_every": None, "train.async_save": "false", "train.mixed_precision": "no", "data.max_examples": 100,
            "tracking.report_to": "[]"}
    argv = ["train", str(QS), *tiny_overrides(tiny_bert, run, **over)]
    codes = forklaunch.launch(argv, tmp_path, env={"SHARDTUNE_FAILPOINTS": "inf@step=3,rank=1"})
    out = (tmp_path / "rank0.log").read_text()
    assert codes == [0, 0], out[-3000:]
    assert "step 3: NaN/Inf loss or grad norm on some rank: the update is skipped on every rank" in out, out[-3000:]
    step3 = next(r for r in _train_rows(run) if r["step"] == 3)
    assert math.isfinite(step3["train/loss"]) and math.isfinite(step3["train/grad_norm"]), step3  # rank 0's own view
    ckpts = {s: _rank_state(run / "checkpoints" / f"step-{s:08d}") for s in (2, 3, 4)}
    assert ckpts[2].keys() == ckpts[3].keys() and any("exp_avg" in k for k in ckpts[2])
    changed = [k for k in ckpts[2] if not torch.equal(ckpts[2][k], ckpts[3][k])]
    assert not changed, changed
    assert any(not torch.equal(ckpts[3][k], ckpts[4][k]) for k in ckpts[3])


# ---------------------------------------------------------------- hub specs


@pytest.mark.parametrize("spec, want", [
    ("hub:imdb", ("imdb", None, "train")),
    ("hub:user/data", ("user/data", None, "train")),
    ("hub:user/data:plain_text", ("user/data", "plain_text", "train")),
    ("hub:user/data@validation", ("user/data", None, "validation")),
    ("hub:user/data:en@test[:10%]", ("user/data", "en", "test[:10%]")),
    ("hub:user/data:@", ("user/data", None, "train")),  # empty parts fall back to the defaults
])
def test_hub_spec_parses_name_config_and_split(spec, want):
    from shardtune.data.hub import parse_hub

    assert parse_hub(spec) == want


def test_hub_records_stream_the_parsed_name_config_and_split(monkeypatch):
    """`data.train_file: hub:...` (records.open_records): datasets.load_dataset gets the parsed parts, streaming."""
    import datasets

    from shardtune.data.records import open_records

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)  # the hub is offline here
    name, records = open_records("hub:user/reviews:en@validation")
    assert calls == [("user/reviews", "en", "validation", True)]
    assert name == "hub:user/reviews:en@validation"
    assert [row for _, row in records] == [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 0}]
    assert [(w.path, w.pos, w.unit) for w, _ in records] == [(name, i, "row") for i in (1, 2, 3)]


# ---------------------------------------------------------------- W&B mode


def test_wandb_mode_disabled_beats_a_key_and_tracking_mode_online(monkeypatch, tmp_path):
    """A Tracker (not only wandb_mode()): WANDB_MODE=disabled with an API key and tracking.mode=online starts no W&B
    run -- no online attempt at an unreachable server, no wandb folder -- and still writes log.jsonl."""
    from test_tracking import FAKE_KEY, refused_url

    from shardtune.config import TrackingConfig
    from shardtune.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", refused_url())
    tracker = Tracker(TrackingConfig(mode="online", init_timeout_s=5), tmp_path, {}, True, "t")
    tracker.log({"x": 1.0}, 1)
    tracker.finish()
    assert tracker.run is None and not tracker.fell_back and not (tmp_path / "wandb").exists()
    assert _rows(tmp_path) == [{"step": 1, "x": 1.0}]


# ---------------------------------------------------------------- optim.max_grad_norm


def _first_moment_norm(run: Path) -> float:
    """|exp_avg| after step 1 of AdamW = (1 - beta1) x |the gradient the update used|."""
    state = _rank_state(run / "checkpoints" / "step-00000001")
    return math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in state.items() if k.endswith("/exp_avg")))


def test_max_grad_norm_null_does_not_clip_and_logs_the_true_norm(lm_run):
    """Step 1's AdamW first moment is (1 - beta1) x the gradient it used: with max_grad_norm null its norm is the logged
    grad norm (which is > 1.0, the default, so a fallback to it would show); with 0.01 it is 0.01, and the logged
    norm is still the unclipped one."""
    from shardtune.config import OptimConfig

    beta1 = OptimConfig().betas[0]
    norms = {}
    for limit in ("null", "0.01"):
        _, run = lm_run(f"clip-{limit}", **{"train.max_steps": 1, "train.save_every": 1, "optim.max_grad_norm": limit})
        logged = _train_rows(run)[0]["train/grad_norm"]
        norms[limit] = (logged, _first_moment_norm(run) / (1 - beta1))
    (logged, used), (clipped_logged, clipped_used) = norms["null"], norms["0.01"]
    assert logged > 1.0, logged
    assert used == pytest.approx(logged, rel=1e-5)
    assert clipped_logged == pytest.approx(logged, rel=1e-6) and clipped_used == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------- optim.warmup_ratio


def test_warmup_ratio_warms_up_over_that_share_of_the_steps(lm_run):
    """warmup_ratio 0.25 of 12 steps: the logged LR warms up over 3 steps, then decays linearly to 0 at step 12 --
    the same LRs as warmup_steps 3 (optim.build_scheduler), not the 2 steps lm_overrides would give."""
    from shardtune.config import OptimConfig
    from shardtune.optim import build_optimizer, build_scheduler

    lr = 3e-3
    _, run = lm_run("warmup", **{"train.max_steps": 12, "optim.warmup_steps": "null", "optim.warmup_ratio": 0.25, "optim.lr": lr})
    logged = [r["train/lr"] for r in _train_rows(run)]
    want = [lr * (i / 3 if i < 3 else (12 - i) / 9) for i in range(12)]  # the LR step i+1 used
    assert logged == pytest.approx(want, rel=1e-9, abs=1e-12)

    cfg = OptimConfig(lr=lr, warmup_steps=3)
    sched = build_scheduler(build_optimizer(torch.nn.Linear(2, 2), cfg), cfg, total_steps=12)
    by_steps = []
    for _ in range(12):
        by_steps.append(sched.get_last_lr()[0])
        sched.step()
    assert logged == pytest.approx(by_steps, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- validation sources, eval batches


def _val_files(tmp_path: Path) -> list[Path]:
    files = []
    for name, words in (("a", "the quick brown fox jumps over the lazy dog "), ("b", "a stitch in time saves nine ")):
        f = tmp_path / f"val-{name}.jsonl"
        f.write_text("".join(json.dumps({"text": f"{name} document {i}: " + words * (i + 1)}) + "\n" for i in range(4)))
        files.append(f)
    return files


def test_eval_reads_exactly_the_validation_sources_and_eval_batches_caps_it(lm_run, tiny_lm_tokenizer, lm_corpus, tmp_path):
    """data.validation_sources (two files, no holdout): the eval's label tokens are those files' tokens (+ EOS per
    document) less the first token of each 32-token row, not the training corpus's; train.eval_batches 2 of
    eval_batch_size 2 counts exactly 2 x 2 full rows, on 1 process and on 2 ranks (the cap is over all ranks)."""
    from transformers import AutoTokenizer

    files = _val_files(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_lm_tokenizer)
    tokens = sum(len(tok(json.loads(line)["text"])["input_ids"]) + 1 for f in files for line in f.read_text().splitlines())
    sources = "[" + ", ".join(f"{{path: {f}}}" for f in files) + "]"
    counts = {}
    for cap in ("null", "2"):
        _, run = lm_run(f"val-{cap}", **{"train.max_steps": 2, "data.validation_sources": sources, "train.eval_batches": cap,
                                          "train.eval_batch_size": 2})
        counts[cap] = [r["eval/tokens"] for r in _rows(run) if "eval/tokens" in r]
    rows = math.ceil(tokens / 32)
    assert tokens > 4 * 32 and counts["null"] == [tokens - rows], (tokens, counts)
    assert counts["2"] == [2 * 2 * 31], counts
    # on 2 ranks the cap is still 2 batches in all (one each), not 2 per rank
    yaml, two = tmp_path / "lm2.yaml", tmp_path / "two"
    yaml.write_text("task: causal_lm\n")
    over = lm_overrides(tiny_lm_tokenizer, lm_corpus, two, **{"train.mixed_precision": "no", "data.holdout": 0, "train.max_steps": 2,
                                                               "data.validation_sources": sources, "train.eval_batches": 2, "train.eval_batch_size": 2})
    assert forklaunch.launch(["train", str(yaml), *over], tmp_path, world=2) == [0, 0]
    assert [r["eval/tokens"] for r in _rows(two) if "eval/tokens" in r] == [2 * 2 * 31]


# ---------------------------------------------------------------- train.resume: never


def test_resume_never_beside_a_checkpoint_is_refused_unless_overwrite_then_starts_fresh(lm_run):
    """A run folder with checkpoints 2 and 4: train.resume=never alone is one sentence (the folder is not empty: a
    fresh run would write over a resumable one); with output.overwrite=true it trains from step 1 again -- the first
    run's losses, no "resumed from" line. find_checkpoint: None for never, step 4 for auto."""
    from conftest import one_sentence
    from shardtune.checkpoint import find_checkpoint

    over = {"train.max_steps": 4, "train.save_every": 2}
    _, run = lm_run("run", **over)
    first = {r["step"]: r["train/loss"] for r in _train_rows(run)}
    assert find_checkpoint(run, "auto").name == "step-00000004" and find_checkpoint(run, "never") is None

    lm_run("run", expect=2, **over, **{"train.resume": "never"})
    one_sentence(2, lm_run.err, "is not empty", "output.overwrite=true")

    out, _ = lm_run("run", **over, **{"train.resume": "never", "output.overwrite": "true"})
    assert "resumed from" not in out and "4 steps, 1 process(es)" in out, out[-2000:]
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 1, 2, 3, 4]  # log.jsonl appends: the second run's steps follow
    assert {r["step"]: r["train/loss"] for r in rows[4:]} == first


# ---------------------------------------------------------------- secrets in what a run writes


def test_secrets_stay_out_of_config_yaml_the_checkpoint_and_the_offline_wandb_config(tiny_bert, tmp_path):
    """W&B offline: a W&B-key-shaped run name and an HF token among the tags are redacted in the written config.yaml,
    in the checkpoint's trainer_state.json and in the offline run's config, and never reach the run's metadata. In its own process (test_tracking._train):
    run in-process, the offline run's config once read back without its "tracking" section."""
    import yaml

    import wandb_reader
    from shardtune.tracking import REDACTED
    from test_tracking import _train

    key, token = "0123456789abcdef" * 2 + "01234567", "hf_" + "Xy7" * 12
    run = tmp_path / "run"
    proc = _train(tmp_path, {"WANDB_MODE": "offline"}, model=tiny_bert, out=run, **{
        "train.max_steps": 1, "train.save_every": 1, "train.eval_every": None, "tracking.report_to": "[wandb]",
        "tracking.run_name": key, "tracking.tags": f"[ci, {token}]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {"config.yaml": (run / "config.yaml").read_text(),
               "trainer_state.json": (run / "checkpoints" / "step-00000001" / "trainer_state.json").read_text(),
               "W&B config": json.dumps(wandb_reader.config(wandb_reader.run_file(run)))}
    written["the offline .wandb file (run name, tags, config, history)"] = wandb_reader.run_file(run).read_bytes().decode("latin-1")
    for where, text in written.items():
        assert key not in text and token not in text, where
    info = wandb_reader.run_info(wandb_reader.run_file(run))
    assert info.display_name == "run" and list(info.tags) == ["ci"]  # the default name; the secret tag dropped
    tracking = yaml.safe_load(written["config.yaml"])["tracking"]
    assert tracking["run_name"] == REDACTED and tracking["tags"] == ["ci", REDACTED]
    assert json.loads(written["trainer_state.json"])["config"]["tracking"] == tracking
    assert json.loads(written["W&B config"])["tracking"]["tags"] == ["ci", REDACTED]


# ---------------------------------------------------------------- LoRA + SFT on 2 processes


def test_lora_sft_on_two_ranks_trains_like_one_process(run_cli, tiny_base, tmp_path):
    """SFT with LoRA adapters on the tiny Llama: 2 ranks (DDP over the adapters, gloo) x 2 rows per step log the
    same per-step losses and the same final eval loss as 1 process x 4 rows (both 2 data slots: its 2 DataLoader
    workers), within float tolerance; the 2-rank run exports a merged model."""
    yaml = tmp_path / "sft.yaml"
    yaml.write_text("task: sft\n")

    def argv(out, world):
        over = lm_overrides(tiny_base, ROOT / "data/pydocs-faq-sft.jsonl", out, **{
            "task": "sft", "model.init": "pretrained", "model.preset": "None", "model.lora": "{r: 4, alpha: 8, dropout: 0.0}",
            "data.sources": f"[{{path: {ROOT / 'data/pydocs-faq-sft.jsonl'}}}]", "data.seq_len": 160, "data.holdout": 10,
            "data.num_workers": 2 if world == 1 else 0, "train.batch_size": 4 // world, "train.max_steps": 6, "train.eval_batch_size": 4,
            "train.mixed_precision": "no", "optim.lr": 1e-2, "optim.weight_decay": 0.1,
        })
        return ["train", str(yaml), *over]

    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(*argv(one, 1))
    assert code == 0, err[-3000:]
    codes = forklaunch.launch(argv(two, 2), tmp_path, world=2)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    assert "2 process(es)" in (tmp_path / "rank0.log").read_text()

    losses = {run: [r["train/loss"] for r in _train_rows(run)] for run in (one, two)}
    assert len(losses[one]) == 6 and losses[two] == pytest.approx(losses[one], rel=1e-5), losses
    assert losses[one][-1] < losses[one][0]  # the adapters learn
    evals = {run: [r["eval/loss"] for r in _rows(run) if "eval/loss" in r][-1] for run in (one, two)}
    assert evals[two] == pytest.approx(evals[one], rel=1e-5), evals
    assert (two / "model" / "model.safetensors").is_file() and not (two / "model" / "adapter_config.json").exists()
