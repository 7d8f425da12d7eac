"""Shared fixtures: offline hub, no W&B key, a tiny BERT built from a config with the packaged tokenizer, a real S3 server."""

from __future__ import annotations

import os
import re
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
os.environ["WANDB_SILENT"] = "true"
os.environ["NETRC"] = os.devnull  # a developer's real W&B login must not turn tests online
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# `train.mixed_precision: auto` resolves to fp32 on every machine the suite runs on: the runs it compares (across
# layouts, to 1e-6) are fp32 runs whatever the CPU; tests of bf16 ask for it, tests/test_hardware.py tests auto itself
os.environ["SHARDTUNE_AUTO_PRECISION"] = "no"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # wandb_reader


@pytest.fixture(autouse=True)
def _no_wandb_service_across_tests():
    """An in-process run starts W&B's service and leaves it in WANDB_SERVICE: later subprocesses (launches, Slurm
    jobs: sbatch exports the environment) would log through this pytest's service instead of their own, and a later
    in-process run would share its state. Each test ends with the service stopped and the variable gone."""
    yield
    if "WANDB_SERVICE" in os.environ:
        import wandb

        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the packaged MiniLM tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from shardtune.assets import packaged_model

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def run_cli(capsys):
    """Run `shardtune ...` in-process; returns (exit code, stdout, stderr)."""
    from shardtune.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def one_sentence(code: int, err: str, *words: str) -> str:
    """A user error: exit code 2, one `shardtune: error:` line holding `words`, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardtune: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def tiny_overrides(model: Path, out: Path, **extra) -> list[str]:
    """A seconds-long run on 240 real Rotten Tomatoes snippets."""
    base = {
        "model.name_or_path": model, "model.max_length": 32, "data.max_examples": 240,
        "train.batch_size": 16, "train.max_steps": 12, "train.log_every": 2, "train.eval_every": 6,
        "optim.lr": 1e-3, "output.dir": out, "tracking.project": "shardtune-tests",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def lm_corpus(tmp_path_factory) -> Path:
    """Real text: the first 400 packaged Rotten Tomatoes snippets as JSONL documents."""
    import csv
    import json

    from shardtune.assets import packaged_data

    with open(packaged_data("rotten-tomatoes"), encoding="utf-8", newline="") as f:
        rows = [r["text"] for _, r in zip(range(400), csv.DictReader(f))]
    out = tmp_path_factory.mktemp("corpus") / "reviews.jsonl"
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return out


@pytest.fixture(scope="session")
def tiny_lm_tokenizer(tmp_path_factory, lm_corpus) -> Path:
    """A 512-token byte-level BPE trained on the corpus (small vocab = fast tiny-model tests), with <eos>."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in lm_corpus.read_text().splitlines()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out = tmp_path_factory.mktemp("tiny-lm-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def lm_overrides(tokenizer: Path, corpus: Path, out: Path, **extra) -> list[str]:
    """A tiny from-scratch Llama on the real corpus: seconds per run."""
    base = {
        "task": "causal_lm", "model.name_or_path": tokenizer, "model.init": "scratch", "model.preset": "tiny",
        "data.sources": f"[{{path: {corpus}}}]", "data.seq_len": 32, "data.holdout": 40,
        "train.batch_size": 4, "train.max_steps": 20, "train.log_every": 1, "train.metric_for_best": "eval/loss",
        "optim.lr": 3e-3, "optim.warmup_steps": 2, "tracking.report_to": "[]", "output.dir": out,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_lm_tokenizer):
    """A saved tiny Llama with the tiny tokenizer: the 'pretrained' model LoRA fine-tunes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_lm_tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
    ))
    out = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- a real S3 server (tests/s3_server.py)


@contextmanager
def _s3_environment(server):
    """The server's credentials and endpoint in os.environ (a developer's AWS profile and session token out), and no
    S3 client, listing or size cached from before; everything restored after."""
    import fsspec

    from shardtune import storage

    names = [*server.env(), "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"]
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ.pop(name, None)
    os.environ.update(server.env())
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # s3fs reads credentials when an instance is made
    storage._LISTINGS.clear()
    storage._SIZES.clear()
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        fsspec.get_filesystem_class("s3").clear_instance_cache()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One SeaweedFS S3 server for the whole run (skips when the `weed` binary is missing). A test that asks for
    it (or for `bucket`) runs with its AWS_* variables set, restored after (`_s3_env`)."""
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3-server"))
    server.start()
    yield server
    server.kill()  # its data is not needed after the run, and a graceful stop takes seconds (tests/s3_server.py)


@pytest.fixture(autouse=True)
def _s3_env(request):
    if "s3" not in request.fixturenames:
        yield
        return
    with _s3_environment(request.getfixturevalue("s3")):
        yield


def _bucket_name(request) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"{stem}-{uuid.uuid4().hex[:8]}".strip("-")


@pytest.fixture
def bucket(s3, request) -> str:
    """A fresh, empty bucket on the session's server: "s3://NAME"."""
    return "s3://" + s3.make_bucket(_bucket_name(request))


@pytest.fixture
def s3_private(tmp_path):
    """A server of this test's own, to stop, kill or restart; its AWS_* variables are set for the test."""
    from s3_server import S3Server

    server = S3Server(tmp_path / "s3-private")
    server.start()
    try:
        with _s3_environment(server):
            yield server
    finally:
        server.kill()
