"""`shardtune generate RUN_DIR PROMPT`: continue a prompt with a trained causal LM.

RUN_DIR is a run folder (its model/ is used) or a model folder itself: a plain
HF folder (a full or merged LoRA run) or a LoRA adapter folder, loaded on the
base model its adapter_config.json names (a folder, packaged or hub name).
Greedy unless a temperature is given; sampling is seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shardtune import ShardtuneError
from shardtune.checkpoint import MODEL_DIR
from shardtune.models import ADAPTER_CONFIG, load_exported


def model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ShardtuneError(f"{path} does not exist; pass a run folder written by `shardtune train` or an HF model folder.")
    return path / MODEL_DIR if (path / MODEL_DIR).is_dir() else path


def _check_causal(folder: Path) -> None:
    """A classifier's folder would load as a causal LM with a random head: refuse it by name."""
    config = folder / "config.json"
    if (folder / ADAPTER_CONFIG).is_file() or not config.is_file():
        return
    archs = json.loads(config.read_text()).get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ShardtuneError(f"{folder} holds a {archs[0]}, not a causal language model; generate needs a causal_lm run (classifiers: shardtune predict).")


def load_for_generate(path: Path):
    folder = model_folder(Path(path))
    _check_causal(folder)
    return load_exported(folder, "causal_lm")


@torch.no_grad()
def generate(path: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0, loaded=None) -> str:
    """The continuation of `prompt` (without it). `loaded` = (model, tokenizer) from load_for_generate, to reuse."""
    if max_new_tokens < 1:
        raise ShardtuneError(f"--max-new-tokens is {max_new_tokens}; give a positive number of tokens.")
    if temperature < 0:
        raise ShardtuneError(f"--temperature is {temperature}; use 0 for greedy decoding or a positive value to sample.")
    model, tokenizer = loaded or load_for_generate(path)
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        raise ShardtuneError("the prompt is empty; give some text to continue.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}  # not token_type_ids: decoders refuse them
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
