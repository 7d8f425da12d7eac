"""Model and tokenizer per task: from a local folder, a packaged default, or the hub; LoRA via PEFT.

With `model.lora` set, the task's model is wrapped by `peft.get_peft_model`: only
the adapters (and, for classification, the head) train. An exported LoRA model
is either a plain HF folder (merged, from a copy: the live model is never
merged in place) or PEFT's adapter folder, whose `adapter_config.json` names
the base model the way the config did (packaged name, hub name or absolute path).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

from shardtune import ShardtuneError
from shardtune.assets import PACKAGED_MODELS, packaged_model
from shardtune.config import TASK_SPECS, Config, LoraConfig, ModelConfig
from shardtune.distributed.init import unsharded_init

ADAPTER_CONFIG = "adapter_config.json"
LABELS_FILE = "label_map.json"  # the same name checkpoint.py writes


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
        model = AutoModelForSequenceClassification.from_pretrained(
            source, config=mcfg, trust_remote_code=cfg.trust_remote_code, ignore_mismatched_sizes=True
        )
    except OSError as exc:
        raise _hub_error(cfg.name_or_path, exc) from None
    return add_lora(model, cfg.lora, "SEQ_CLS", adapter_base_name(cfg.name_or_path)) if cfg.lora else model


def position_limit(model) -> int | None:
    """The positions a loaded model was trained with: its config's max_position_embeddings (GPT-2: n_positions), less
    RoBERTa's offset (its position table starts after the padding index); None where the config names none."""
    import torch

    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            return min(limit, module.num_embeddings - module.padding_idx - 1)
    return limit


def check_positions(model, cfg: Config) -> None:
    """Refuse rows longer than a pretrained model's positions (a position table would be indexed past its end at the
    first long row); a causal LM from scratch gets its positions from the config."""
    spec = TASK_SPECS[cfg.task]
    length, limit = spec.seq_len_of(cfg), position_limit(model)
    if limit is not None and length > limit and not (spec.causal and cfg.model.init == "scratch"):
        raise ShardtuneError(f"{spec.seq_len} {length} is more than the {limit} positions {cfg.model.name_or_path} was trained "
                             f"with; set {spec.seq_len} to at most {limit}.")


# Llama-architecture sizes for pretraining from scratch (vocab from the tokenizer).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}


def attention(cfg: ModelConfig) -> str:
    """auto: FlashAttention-2 where the flash_attn package and a GPU are there, else PyTorch SDPA."""
    if cfg.attention != "auto":
        return cfg.attention
    import importlib.util

    import torch

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


# The dropout probabilities of causal-LM configs (Llama: attention_dropout; GPT-2: *_pdrop; others: dropout, hidden_dropout).
LM_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def _dropout_overrides(mcfg, p: float | None) -> dict[str, float]:
    """model.dropout for every dropout probability `mcfg` has ({} when model.dropout is unset)."""
    return {} if p is None else {k: p for k in LM_DROPOUT_KEYS if isinstance(getattr(mcfg, k, None), (int, float))}


def load_causal_lm(cfg: ModelConfig, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    try:
        if cfg.init == "pretrained":
            source = resolve_model(cfg.name_or_path)
            drop = _dropout_overrides(AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code), cfg.dropout)
            model = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=cfg.trust_remote_code, attn_implementation=attention(cfg), **drop
            )
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
            for key, value in _dropout_overrides(mcfg, cfg.dropout).items():
                setattr(mcfg, key, value)
            if tokenizer.eos_token_id is not None:
                mcfg.eos_token_id = tokenizer.eos_token_id
            model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.trust_remote_code, attn_implementation=attention(cfg))
    except OSError as exc:
        raise _hub_error(cfg.name_or_path, exc) from None
    if cfg.gradient_checkpointing:  # before LoRA: transformers then also makes the inputs require grad
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora is None:
        return model
    if cfg.init == "scratch" and not cfg.lora.merge:
        raise ShardtuneError(
            "model.lora with model.init=scratch and lora.merge=false would export adapters for random base weights that are "
            "saved nowhere; set model.lora.merge=true, or fine-tune a saved model with model.init=pretrained."
        )
    return add_lora(model, cfg.lora, "CAUSAL_LM", adapter_base_name(cfg.name_or_path) if cfg.init == "pretrained" else None)


# ---------------------------------------------------------------- LoRA (PEFT)


def adapter_base_name(name: str) -> str:
    """How an adapter names its base model: a local folder absolutely (runs move between working dirs), else as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def is_peft(model) -> bool:
    peft = sys.modules.get("peft")  # not imported = no PEFT model exists; spares full fine-tunes the import
    return peft is not None and isinstance(model, peft.PeftModel)


def _adaptable_layers(model) -> list[tuple[str, str]]:
    """(full name, kind) of the leaf layers LoRA can adapt; kind 'linear' for Linear-like ones."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = {torch.nn.Linear: "linear", Conv1D: "linear", torch.nn.Embedding: "embedding", torch.nn.Conv1d: "conv", torch.nn.Conv2d: "conv"}
    return [(name, kinds[type(m)]) for name, m in model.named_modules() if type(m) in kinds]


def check_lora_targets(model, targets: list[str]) -> list[str] | str:
    """PEFT's matching (a module's name or its dotted suffix), checked before PEFT's own less helpful error."""
    if [t.lower() for t in targets] == ["all-linear"]:
        return "all-linear"  # PEFT's shorthand: every Linear layer but the output layer
    layers = _adaptable_layers(model)
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name, _ in layers)]
    if unknown:
        linear = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name, kind in layers if kind == "linear"))
        raise ShardtuneError(
            f"model.lora.target_modules names {', '.join(unknown)}, which {type(model).__name__} does not have; "
            f"its Linear layers are {linear}: choose among them (or target_modules=[all-linear])."
        )
    return list(targets)


def _head_modules(model) -> list[str]:
    """A classifier's head: its top-level children besides the encoder (classifier, score, pre_classifier, ...)."""
    encoder = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children() if name != encoder and any(True for _ in child.parameters())]


def add_lora(model, cfg: LoraConfig, task_type: str, base_name: str | None):
    """The model wrapped for LoRA: only adapters train, and for SEQ_CLS the (new) head too, in full."""
    import peft

    targets = check_lora_targets(model, cfg.target_modules)
    heads = _head_modules(model) if task_type == "SEQ_CLS" else None
    lcfg = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type=task_type, modules_to_save=heads
    )
    wrapped = peft.get_peft_model(model, lcfg)
    wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = base_name
    wrapped.shardtune_merge = cfg.merge  # read by export_model, whose callers know no config
    if heads and not any(p.requires_grad for n, p in wrapped.named_parameters() if ".modules_to_save." in n):
        raise RuntimeError(f"PEFT left the head {heads} of {type(model).__name__} frozen")  # a bug, not user error
    return wrapped


def merged_copy(peft_model, state: dict):
    """A plain HF model: `state` (the PEFT model's full state dict) loaded into a fresh skeleton and merged there.

    The live model is left alone: its tensors are shared, except the merged base weights, which are cloned first.
    """
    import peft
    import torch

    base = peft_model.get_base_model()
    lcfg = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    lcfg.modules_to_save = None if lcfg.modules_to_save is None else list(dict.fromkeys(lcfg.modules_to_save))
    with unsharded_init(), torch.device("meta"):
        skeleton = peft.get_peft_model(type(base)._from_config(copy.deepcopy(base.config)), lcfg)
    tied = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)} - {n for n, _ in skeleton.named_parameters()}
    state = {k: v.detach().clone() if ".base_layer." in k else v for k, v in state.items()}
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"state dict does not fit the LoRA skeleton: missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    merged = skeleton.merge_and_unload()
    if getattr(merged.config, "tie_word_embeddings", False):
        merged.tie_weights()
    return merged


def save_lora(peft_model, folder: Path, state: dict | None = None, merge: bool | None = None, max_shard_size: str = "2GB") -> None:
    """Merged: a plain HF folder; else PEFT's adapter folder (adapter_model.safetensors + adapter_config.json)."""
    state = peft_model.state_dict() if state is None else state
    merge = getattr(peft_model, "shardtune_merge", True) if merge is None else merge
    if merge:
        merged_copy(peft_model, state).save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    else:
        # the vocabulary is the base model's: no need for PEFT to look the base up (on the hub, for a packaged name)
        peft_model.save_pretrained(folder, state_dict=state, safe_serialization=True, save_embedding_layers=False)


def read_exported_state(folder: Path, live) -> dict:
    """The tensors to load, in the live model's key names, from a folder `export_model` wrote for it: plain tensors,
    never the live (possibly sharded) ones.

    A plain model reads the whole HF folder. A PEFT model gets part of its state only (load it with strict=False):
    from an adapter folder its adapter (the frozen base weights stay as they are), from a merged folder its base
    weights with the LoRA update zeroed (lora_B = 0, lora_A stays): it then computes exactly the exported function;
    training on from there would start a fresh adapter. Only the live model's key names and shapes are read.
    """
    folder = Path(folder)
    if not is_peft(live):
        with unsharded_init():  # from_pretrained, not raw safetensors: it maps saved key names to the model's
            return type(live).from_pretrained(folder).state_dict()
    live_state = {k: (tuple(v.shape), v.dtype) for k, v in live.state_dict().items()}
    if (folder / ADAPTER_CONFIG).is_file():
        from peft.utils import load_peft_weights

        return _adapter_to_live(live, live_state, load_peft_weights(str(folder), device="cpu"), folder)
    with unsharded_init():
        plain = type(live.get_base_model()).from_pretrained(folder).state_dict()
    return _merged_to_live(live, live_state, plain, folder)


def _adapter_to_live(live, live_state: dict, saved: dict, folder: Path) -> dict:
    """PEFT saves adapter keys without the adapter name, and a saved module's weights under the module's own name."""
    from peft.utils import AuxiliaryTrainingWrapper

    name = live.active_adapter
    to_live = {}
    for key in live_state:
        parts = key.split(".")
        if parts[-1] == name:  # a bare nn.Parameter
            to_live[".".join(parts[:-1])] = key
        elif len(parts) > 2 and parts[-2] == name:  # a module's weight: ...lora_A.default.weight
            to_live[".".join(parts[:-2] + parts[-1:])] = key
    for prefix, module in live.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for saved_key, live_key in module.adapter_state_dict_load_map(name).items():
                to_live[f"{prefix}.{saved_key}"] = f"{prefix}.{live_key}"
    unknown = [k for k in saved if k not in to_live]
    if unknown:
        raise ShardtuneError(f"the adapter in {folder} does not fit this model ({unknown[0]} has no place in it); it was trained with another lora config or base model.")
    return {to_live[k]: v for k, v in saved.items()}


def _merged_to_live(live, live_state: dict, plain: dict, folder: Path) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    name, prefix = live.active_adapter, "base_model.model."
    owners = {n: m for n, m in live.get_base_model().named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}
    import torch

    out = {}
    for key, (shape, dtype) in live_state.items():
        inner = key.removeprefix(prefix)
        parts = inner.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in owners), None)
        original = inner
        if owner is not None:
            rest = inner[len(owner) + 1 :]
            wrapper = f"modules_to_save.{name}."
            for infix in ("base_layer.", "original_module.", wrapper):
                if rest.startswith(infix):
                    original = f"{owner}.{rest[len(infix):]}"
                    break
            else:  # an adapter tensor: lora_A stays, lora_B becomes zero so that the adapter adds nothing
                if rest.startswith(("lora_B.", "lora_embedding_B.")):
                    out[key] = torch.zeros(shape, dtype=dtype)
                continue
        if original not in plain:
            raise ShardtuneError(f"the model in {folder} does not fit this model ({original} is missing); it was exported from another model.")
        out[key] = plain[original]
    return out


def load_exported(folder: Path, task: str = "causal_lm"):
    """(model, tokenizer) from an exported folder: a plain HF model, or a LoRA adapter on the base model it names."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    tokenizer_source = folder
    if (folder / ADAPTER_CONFIG).is_file():
        import peft

        base_name = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ShardtuneError(
                f"the adapter in {folder} names no base model (base_model_name_or_path in {ADAPTER_CONFIG}); "
                "set it to the base model's folder or packaged name."
            )
        source = resolve_model(base_name)
        extra = {}
        if task != "causal_lm" and (folder / LABELS_FILE).is_file():
            id2label = {int(k): v for k, v in json.loads((folder / LABELS_FILE).read_text())["id2label"].items()}
            extra = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        try:
            base = auto.from_pretrained(source, **extra)
        except OSError as exc:
            raise _hub_error(base_name, exc) from None
        model = peft.PeftModel.from_pretrained(base, folder).merge_and_unload()  # a plain model: faster, same outputs
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer_source = source
    elif (folder / "config.json").is_file():
        model = auto.from_pretrained(folder)
    else:
        raise ShardtuneError(f"{folder} holds no model (no config.json or {ADAPTER_CONFIG}); pass a run folder written by `shardtune train` or an HF model folder.")
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_source)
