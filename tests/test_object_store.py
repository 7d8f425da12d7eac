"""Runs whose data and run folder are on object storage: a real SeaweedFS S3 server (tests/s3_server.py), real
ranks (tests/forklaunch.py), nothing mocked.

- 2 ranks read the corpus from s3:// and checkpoint to s3:// in the background; rank 1 is SIGKILLed after it
  uploaded part of checkpoint 12: that checkpoint has no seal, so the rerun skips it, resumes from 8 and logs the
  uninterrupted local run's losses bit for bit (so the batches read from the store are the local file's too).
- A sealed checkpoint whose file was replaced in the bucket is refused before anything in it is unpickled.
- The server restarted while the stream reads: retried, same losses; gone past the retry budget: one sentence, no
  traceback, the sealed checkpoint still there.
- export / predict / generate from the store; no credential in any file a run writes; bad URLs in one sentence.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import time
from pathlib import Path

import fsspec
import pytest

import forklaunch
from conftest import lm_overrides, one_sentence
from shardtune import storage
from shardtune.run_store import SEAL, RunStore

STEPS, EVERY = 24, 4


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "train/loss" in r}


def _argv(tok, corpus, out, stage: Path, **extra) -> list[str]:
    config = stage.parent / "lm.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("task: causal_lm\n")
    over = {"train.max_steps": STEPS, "train.save_every": EVERY, "train.eval_every": None, "data.holdout": 0, "data.num_workers": 2,
            "data.partition_bytes": 4096, "optim.weight_decay": 0.1, "output.staging": stage, "train.save_total_limit": 10, **extra}
    return ["train", str(config), *lm_overrides(tok, corpus, out, **over)]


def _launch(argv, logs: Path, env: dict, world: int = 2, failpoints: str = "") -> tuple[list[int], str]:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "rank0.log"
    before = log.stat().st_size if log.exists() else 0
    codes = forklaunch.launch(argv, logs, world=world, env={**env, "SHARDTUNE_FAILPOINTS": failpoints})
    return codes, log.read_text()[before:]


@pytest.fixture(scope="module")
def reference(tiny_lm_tokenizer, lm_corpus, tmp_path_factory):
    """The uninterrupted run, data and run folder local: the losses every store run must log."""
    out = tmp_path_factory.mktemp("local-ref")
    codes, _ = _launch(_argv(tiny_lm_tokenizer, lm_corpus, out / "run", out / "stage"), out, {})
    assert codes == [0, 0]
    return _losses(out / "run")


@pytest.fixture
def corpus_url(bucket, lm_corpus) -> str:
    url = storage.join(bucket, "corpus", lm_corpus.name)
    storage.put_file(str(lm_corpus), url)
    return url


def test_a_rank_killed_mid_upload_leaves_no_seal_and_the_rerun_resumes_bit_for_bit(s3, bucket, corpus_url, reference, tiny_lm_tokenizer, tmp_path):
    run_url, stage = storage.join(bucket, "runs", "r"), tmp_path / "stage"
    argv = _argv(tiny_lm_tokenizer, corpus_url, run_url, stage, **{"train.async_save": "true"})
    reads = tmp_path / "reads"
    reads.mkdir()
    codes, _ = _launch(argv, tmp_path, {**s3.env(), "SHARDTUNE_STORE_LOG": str(reads)}, failpoints="kill@upload=12,rank=1")
    assert codes != [0, 0]
    lists = [line for f in reads.iterdir() for line in f.read_text().splitlines() if line.split("\t")[1:3] == ["list", corpus_url]]
    assert len(lists) == 1, lists  # one listing per run, shared by the 2 ranks and their 4 workers
    store = RunStore(run_url)
    uploaded = storage.listing(store.ckpt_url("step-00000012") + "/", fresh=True)
    assert uploaded and not any(u.endswith(SEAL) for u, _ in uploaded), uploaded  # part of it is there, unsealed
    assert store.sealed()[0] == "step-00000008"

    # the rerun saves every 5 steps and keeps 2: the sealed ones before, and the dead upload's leftover, are pruned
    codes, out = _launch([*argv, "train.save_every=5", "train.save_total_limit=2"], tmp_path, s3.env())
    assert codes == [0, 0], out[-3000:]
    assert "skipping unsealed checkpoint" in out and re.search(r"resumed from step-00000008 at step 8\b", out), out[-3000:]
    assert _losses(stage) == reference
    assert store.sealed() == ["step-00000020", "step-00000015"]
    left = {u.split("/checkpoints/")[1].split("/")[0] for u, _ in storage.listing(storage.join(run_url, "checkpoints") + "/", fresh=True)}
    assert left == {"step-00000020", "step-00000015"}  # objects: the store may keep empty folder entries
    assert storage.exists(storage.join(run_url, "model", "model.safetensors")) and storage.exists(storage.join(run_url, "metrics.json"))


def test_a_file_replaced_after_sealing_is_refused_before_anything_is_unpickled(s3, bucket, corpus_url, tiny_lm_tokenizer, tmp_path, run_cli,
                                                                                monkeypatch):
    run_url, stage = storage.join(bucket, "runs", "t"), tmp_path / "stage"
    argv = _argv(tiny_lm_tokenizer, corpus_url, run_url, stage, **{"train.max_steps": 8, "data.num_workers": 0})
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    assert run_cli(*argv)[0] == 0
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    metadata = storage.join(RunStore(run_url).ckpt_url("step-00000008"), "dcp", ".metadata")
    size = storage.size(metadata)
    payload = pickle.dumps(Payload())
    storage.put_bytes(metadata, payload + b"\0" * (size - len(payload)))  # the sealed size: only the hash can tell
    import shutil

    shutil.rmtree(stage)  # another node: nothing local to trust
    code, _, err = run_cli(*argv, "train.max_steps=12")
    assert one_sentence(code, err, "step-00000008", "dcp/.metadata", "nothing in it was loaded")
    assert not marker.exists()


def _watch(run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "log.jsonl").exists() and max(_losses(run), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def test_the_server_restarted_mid_stream_is_retried_and_the_losses_are_the_uninterrupted_runs(s3_private, tiny_lm_tokenizer, lm_corpus,
                                                                                              tmp_path):
    """One rank, 1 worker reading the store's corpus in 4 KB partitions; the server goes away after step 6 for ~4 s."""
    s3 = s3_private
    bucket = "s3://" + s3.make_bucket("restart")
    url = storage.join(bucket, lm_corpus.name)
    env = s3.env()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        storage.put_file(str(lm_corpus), url)
    over = {"data.num_workers": 1, "train.save_every": None, "train.max_steps": 40, "train.log_every": 1}
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert _launch(_argv(tiny_lm_tokenizer, lm_corpus, local, tmp_path / "s1", **over), tmp_path / "l", {}, world=1)[0] == [0]

    def outage():
        _watch(remote, 6)
        s3.stop(grace=0)
        time.sleep(4)
        s3.start()

    log_dir = tmp_path / "reads"
    log_dir.mkdir()
    t = threading.Thread(target=outage)
    t.start()
    codes, out = _launch(_argv(tiny_lm_tokenizer, url, remote, tmp_path / "s2", **over), tmp_path / "r",
                         {**env, "SHARDTUNE_STORE_LOG": str(log_dir)}, world=1)
    t.join()
    assert codes == [0], out[-3000:]
    retries = [line for f in log_dir.iterdir() for line in f.read_text().splitlines() if "\tretry\t" in line]
    assert retries, "the outage did not meet a read"
    assert _losses(remote) == _losses(local)


def test_the_server_gone_past_the_retry_budget_ends_the_run_in_one_sentence_and_keeps_the_sealed_checkpoint(
        s3_private, tiny_lm_tokenizer, lm_corpus, tmp_path):
    s3 = s3_private
    bucket = "s3://" + s3.make_bucket("gone")
    env = {**s3.env(), "SHARDTUNE_STORE_RETRY_SECONDS": "3"}
    url, run_url = storage.join(bucket, lm_corpus.name), storage.join(bucket, "run")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        storage.put_file(str(lm_corpus), url)
        over = {"data.num_workers": 1, "train.max_steps": 60, "train.log_every": 1, "train.async_save": "false"}
        stage = tmp_path / "stage"
        t = threading.Thread(target=lambda: (_watch(stage, 6), s3.stop(grace=0)))
        t.start()
        codes, out = _launch(_argv(tiny_lm_tokenizer, url, run_url, stage, **over), tmp_path, env, world=1)
        t.join()
        assert codes == [2], out[-3000:]
        said = [line for line in out.splitlines() if line.startswith("shardtune: error:")]
        assert len(said) == 1 and "did not serve" in said[0] and "Traceback" not in out, out[-3000:]
        s3.start()
        assert RunStore(run_url).newest() == "step-00000004"


def test_export_and_generate_from_the_store(s3, bucket, corpus_url, tiny_lm_tokenizer, tmp_path, run_cli, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    run_url, stage = storage.join(bucket, "runs", "e"), tmp_path / "stage"
    assert run_cli(*_argv(tiny_lm_tokenizer, corpus_url, run_url, stage, **{"train.max_steps": 8, "data.num_workers": 0}))[0] == 0
    exported = storage.join(bucket, "exported")
    assert run_cli("export", RunStore(run_url).ckpt_url("step-00000008"), "--out", exported)[0] == 0
    assert run_cli("export", str(stage / "checkpoints" / "step-00000008"), "--out", str(tmp_path / "local-export"))[0] == 0
    storage.download(storage.join(exported, "model.safetensors"), str(tmp_path / "remote.safetensors"))
    from safetensors.torch import load_file

    remote, local = load_file(tmp_path / "remote.safetensors"), load_file(tmp_path / "local-export" / "model.safetensors")
    assert remote.keys() == local.keys() and all(remote[k].equal(local[k]) for k in local)
    for there, here in ((exported, tmp_path / "local-export"), (run_url, stage)):  # an exported folder, a run's model/
        a, b = run_cli("generate", there, "the film", "--max-new-tokens", "8"), run_cli("generate", str(here), "the film", "--max-new-tokens", "8")
        assert a[0] == b[0] == 0 and a[1] == b[1]


def test_a_classifier_trains_on_a_csv_in_the_store_and_predicts_from_it(s3, bucket, tiny_bert, tmp_path, run_cli, monkeypatch):
    """The same losses as the local CSV (the records read from s3:// are the file's), and predict from the run's URL."""
    from conftest import ROOT, tiny_overrides
    from shardtune.assets import packaged_data

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    csv_url = storage.join(bucket, "rt.csv")
    storage.put_file(str(packaged_data("rotten-tomatoes")), csv_url)
    qs, runs = ROOT / "configs" / "quickstart.yaml", {}
    for name, data, out in (("local", packaged_data("rotten-tomatoes"), tmp_path / "local"), ("store", csv_url, storage.join(bucket, "cls"))):
        over = {"data.train_file": data, "output.staging": tmp_path / f"stage-{name}", "train.max_steps": 6, "tracking.report_to": "[]"}
        assert run_cli("train", qs, *tiny_overrides(tiny_bert, out, **over))[0] == 0
        runs[name] = tmp_path / "local" if name == "local" else tmp_path / f"stage-{name}"
    assert _losses(runs["store"]) == _losses(runs["local"])
    a = run_cli("predict", storage.join(bucket, "cls"), "a fine film", "a dull mess")
    b = run_cli("predict", str(runs["local"]), "a fine film", "a dull mess")
    assert a[0] == b[0] == 0 and a[1] == b[1]


def test_no_credential_reaches_any_file_a_run_writes(s3, bucket, corpus_url, tiny_lm_tokenizer, tmp_path, monkeypatch):
    """W&B offline files, the run folder, the staging folder and every object the run put in the store."""
    env = s3.env()
    run_url, stage = storage.join(bucket, "runs", "secret"), tmp_path / "stage"
    argv = _argv(tiny_lm_tokenizer, corpus_url, run_url, stage, **{"train.max_steps": 4, "data.num_workers": 0, "tracking.report_to": "[wandb]",
                                                                     "tracking.mode": "offline"})
    codes, out = _launch(argv, tmp_path / "logs", {**env, "WANDB_DIR": str(tmp_path / "wandb")}, world=1)
    assert codes == [0], out[-3000:]
    secrets = [env["AWS_SECRET_ACCESS_KEY"].encode(), env["AWS_ACCESS_KEY_ID"].encode()]
    written = [p for root in (stage, tmp_path / "wandb") for p in root.rglob("*") if p.is_file()]
    assert len(written) > 10 and any("wandb" in str(p) for p in written)
    for path in written:
        assert not any(s in path.read_bytes() for s in secrets), path
    for url, _ in storage.listing(run_url + "/", fresh=True):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert not any(s in storage.read_bytes(url) for s in secrets), url


@pytest.mark.parametrize("case", ["wrong key", "no bucket", "no package"])
def test_bad_store_urls_and_credentials_in_one_sentence(case, s3, bucket, corpus_url, tiny_lm_tokenizer, tmp_path, run_cli, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    source, words = corpus_url, ()
    if case == "wrong key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        fsspec.get_filesystem_class("s3").clear_instance_cache()  # a new process would make its client anew
        storage._LISTINGS.clear()
        storage._SIZES.clear()
        words = ("denied", "AWS_ACCESS_KEY_ID")
    elif case == "no bucket":
        source, words = "s3://no-such-bucket-here/corpus.jsonl", ("s3://no-such-bucket-here", "does not exist")
    else:
        source, words = "gs://some-bucket/corpus.jsonl", ("gcsfs", "pip install gcsfs")
    code, _, err = run_cli(*_argv(tiny_lm_tokenizer, source, tmp_path / "run", tmp_path / "stage", **{"data.num_workers": 0}))
    assert one_sentence(code, err, *words)
    assert "not-the-secret" not in err
