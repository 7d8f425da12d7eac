"""Model and tokenizer per task: from a local folder, a packaged default, or the hub."""

from __future__ import annotations

import os
from pathlib import Path

from shardtune import ShardtuneError
from shardtune.assets import PACKAGED_MODELS, packaged_model
from shardtune.config import ModelConfig


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(name: str) -> bool:
    # hub names are `name` or `org/name`; anything else is meant as a folder
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_model(name: str) -> str:
    """A local folder, packaged name or cached hub name -> what `from_pretrained` takes."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "tokenizer_config.json")):
            raise ShardtuneError(f"model folder {path} has no config.json; point model.name_or_path at a saved HF model folder.")
        return str(path)
    packaged = packaged_model(name)
    if packaged is not None:
        return str(packaged)
    alternatives = ", ".join(PACKAGED_MODELS)
    if _looks_like_path(name):
        raise ShardtuneError(f"model path {name} does not exist; give an existing folder or a packaged model ({alternatives}).")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ShardtuneError(
                f"model {name!r} is a hub name but the hub is offline (HF_HUB_OFFLINE=1) and it is not cached; "
                f"use a packaged model ({alternatives}) or a local folder."
            )
    return name


def _hub_error(name: str, exc: Exception) -> ShardtuneError:
    alternatives = ", ".join(PACKAGED_MODELS)
    return ShardtuneError(
        f"could not load model {name!r} ({type(exc).__name__}); without hub access use a packaged model ({alternatives}) or a local folder."
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = resolve_model(cfg.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _hub_error(cfg.name_or_path, exc) from None


def load_classifier(cfg: ModelConfig, labels: list[str]):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = resolve_model(cfg.name_or_path)
    extra = {}
    if cfg.dropout is not None:
        extra = {"hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout}
    try:
        mcfg = AutoConfig.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        )
        return AutoModelForSequenceClassification.from_pretrained(
            source, config=mcfg, trust_remote_code=cfg.trust_remote_code, ignore_mismatched_sizes=True
        )
    except OSError as exc:
        raise _hub_error(cfg.name_or_path, exc) from None


# Llama-architecture sizes for pretraining from scratch (vocab from the tokenizer).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
}


def load_causal_lm(cfg: ModelConfig, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    try:
        if cfg.init == "pretrained":
            model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
        else:
            if cfg.preset is not None:
                if cfg.preset not in PRESETS:
                    raise ShardtuneError(f"unknown model.preset {cfg.preset!r}; choose one of {', '.join(PRESETS)} or leave it empty.")
                mcfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max(cfg.max_length, 2048), **PRESETS[cfg.preset])
            else:
                mcfg = AutoConfig.from_pretrained(resolve_model(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
            for key, value in cfg.arch.items():
                if not hasattr(mcfg, key):
                    raise ShardtuneError(f"model.arch.{key} is not a field of {type(mcfg).__name__}; check the spelling.")
                setattr(mcfg, key, value)
            if tokenizer.eos_token_id is not None:
                mcfg.eos_token_id = tokenizer.eos_token_id
            model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _hub_error(cfg.name_or_path, exc) from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model
