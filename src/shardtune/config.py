"""The typed config tree: YAML file + dotted CLI overrides, validated.

Every field has a default and a one-line doc. Unknown keys are errors that name
the key and the nearest valid one; bad values name the key, the value and what
is allowed. All of them surface as one `ConfigError` sentence.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shardtune import ShardtuneError


class ConfigError(ShardtuneError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


LM_TASKS = ("causal_lm", "sft")
DEFAULT_MODELS = {"classification": "minilm-l6", "causal_lm": "smollm2-135m", "sft": "smollm2-135m", "dpo": "smollm2-135m"}


class LoraConfig(_Section):
    r: int = Field(8, gt=0, le=4096, description="Rank of the low-rank update.")
    alpha: float = Field(16, gt=0, description="Scale of the update (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, description="Module names to adapt.")
    merge: bool = Field(True, description="Export the merged model (plain HF folder); False = the adapter alone.")


class ModelConfig(_Section):
    name_or_path: Optional[str] = Field(
        None, description="Local HF folder, packaged model (minilm-l6, smollm2-135m) or hub name; None = the task's packaged default."
    )
    init: Literal["pretrained", "scratch"] = Field("pretrained", description="Load weights, or initialize from the architecture (pretraining).")
    preset: Optional[str] = Field(None, description="With init=scratch: a Llama-architecture size (see models.PRESETS); None = name_or_path's config.")
    arch: dict[str, Any] = Field({}, description="With init=scratch: architecture overrides, e.g. {num_hidden_layers: 4}.")
    max_length: int = Field(128, gt=0, le=1_000_000, description="Tokens per example; longer texts are truncated.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder/hub; off unless you trust it.")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="Override the model's dropout probabilities.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% more compute.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel for LMs; auto = flash_attention_2 when installed on a GPU, else sdpa."
    )
    compile: bool = Field(False, description="torch.compile the model (inductor); the first steps pay the compile time.")
    chunked_loss: bool = Field(
        True, description="LM tasks: the cross entropy from the last hidden states in chunks, never the whole batch's logits (losses.py); false = full logits."
    )
    lora: Optional[LoraConfig] = Field(None, description="Train LoRA adapters (PEFT) instead of all weights; None = full fine-tune.")


class DataConfig(_Section):
    kind: Literal["files"] = Field("files", description="Record files for classification (set from task).")
    train_file: str = Field(
        "rotten-tomatoes",
        description="CSV/TSV/JSONL/JSON/parquet file, a folder with one subfolder of .txt files per label, a packaged data set name, or hub:NAME[:CONFIG][@SPLIT].",
    )
    validation_file: Optional[str] = Field(None, description="Validation data (same forms); None = seeded hold-out of the train data.")
    test_file: Optional[str] = Field(None, description="Test data (same forms); None = seeded hold-out of the train data.")
    text_column: str = Field("text", min_length=1, description="Column holding the input text.")
    label_column: str = Field("label", min_length=1, description="Column holding the label (string or int).")
    labels: Optional[list[str]] = Field(None, description="The label set, in id order; None = sorted distinct train labels.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Hold-out fraction for validation when no file is given.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Hold-out fraction for test when no file is given.")
    split_seed: int = Field(42, description="Seed of the hold-out split (independent of train.seed).")
    max_examples: Optional[int] = Field(None, gt=0, description="Use only the first N train examples (smoke runs).")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (seeded, every example once per epoch): far less padding; false = random order."
    )

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("data.validation_fraction + data.test_fraction must be < 1 so that train data remains")
        return self


# ---------------------------------------------------------------- the streaming stage (data/stream.py)


class SourceSpec(_Section):
    path: str = Field(..., min_length=1, description="File, folder, glob (** allowed) or hub:NAME[:CONFIG][@SPLIT].")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight of this source in the mixture.")
    text_field: str = Field("text", min_length=1, description="Field or column holding the document text (not used for txt).")
    format: Optional[Literal["jsonl", "json", "csv", "tsv", "parquet", "txt", "packed"]] = Field(
        None, description="Force a file format; None = from each file's extension; packed = a cache written by `shardtune preprocess --write` (path is its folder)."
    )
    txt_unit: Literal["line", "file"] = Field("line", description="For txt files: one document per line or per file.")
    split: bool = Field(
        True, description="Split large jsonl/txt/csv/tsv files into byte-range partitions; false = one partition per file (CSV with line breaks inside quoted fields)."
    )


class CleanConfig(_Section):
    nfc: bool = Field(True, description="Normalize text to Unicode NFC (composed characters).")
    strip_control: bool = Field(True, description="Remove control characters (NUL, escapes, C1) except tab and newlines.")
    min_chars: int = Field(1, ge=1, description="Drop documents with fewer non-space characters (1 = drop only empty ones).")
    max_chars: Optional[int] = Field(None, gt=0, description="Documents longer than this (characters) are handled by too_long; None = no limit.")
    too_long: Literal["split", "truncate", "drop"] = Field("split", description="Too-long documents: split into max_chars pieces, truncate, or drop.")
    dedup: bool = Field(False, description="Drop exact duplicates (by hash of the cleaned text) within each partition; see data/docstream.py for the cost.")


class SftConfig(_Section):
    format: Literal["auto", "chat", "prompt_response"] = Field(
        "auto", description="Record shape: chat (a messages list), prompt_response (two text fields), or auto (per record, by which field it has)."
    )
    messages_field: str = Field("messages", min_length=1, description="Field holding the chat turns [{role, content}, ...].")
    prompt_field: str = Field("prompt", min_length=1, description="Field holding the prompt (prompt_response records).")
    response_field: str = Field("response", min_length=1, description="Field holding the response (prompt_response records).")
    too_long: Literal["drop", "truncate"] = Field("drop", description="An example longer than seq_len: drop and count it, or cut the response's tail.")


class DpoConfig(_Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference (rewards are beta * log-ratio).")
    prompt_field: str = Field("prompt", min_length=1, description="Field holding the prompt (text or chat turns); absent = the chosen and rejected conversations' shared first turns.")
    chosen_field: str = Field("chosen", min_length=1, description="Field holding the preferred response (text, or assistant turns / a whole conversation).")
    rejected_field: str = Field("rejected", min_length=1, description="Field holding the dispreferred response (same forms as chosen).")
    max_length: int = Field(512, ge=2, le=1_000_000, description="Tokens per chosen or rejected sequence (prompt + response).")
    too_long: Literal["drop", "truncate"] = Field("drop", description="A pair with a side longer than max_length: drop and count it, or cut the responses' tails.")


class PairsConfig(_Section):
    kind: Literal["pairs"] = Field("pairs", description="Preference pairs held in memory (set from task dpo).")
    train_file: str = Field(..., min_length=1, description="JSONL/JSON/parquet file of preference records (prompt/chosen/rejected or chat pairs).")
    validation_file: Optional[str] = Field(None, description="Held-out pairs (same forms); None = a seeded hold-out of the train pairs.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Hold-out fraction for validation when no file is given.")
    split_seed: int = Field(42, description="Seed of the hold-out split (independent of train.seed).")
    max_examples: Optional[int] = Field(None, gt=0, description="Use only the first N train records (smoke runs).")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes.")
    clean: CleanConfig = CleanConfig()
    dpo: DpoConfig = DpoConfig()


class StreamConfig(_Section):
    kind: Literal["stream"] = Field("stream", description="Streamed documents for language-model tasks (set from task).")
    sources: list[SourceSpec] = Field(..., min_length=1, description="Training sources, mixed by weight.")
    validation_sources: list[SourceSpec] = Field([], description="Validation sources; [] = use holdout.")
    holdout: int = Field(0, ge=0, description="Hold out this many train documents (seeded, from the first 10x) as validation.")
    seed: int = Field(0, description="Seed of the mixture draws, shuffle and hold-out (independent of train.seed).")
    shuffle_block: int = Field(0, ge=0, description="Shuffle documents within consecutive blocks of this many (seeded, resumable); 0 = keep order.")
    on_source_end: Literal["stop", "drop", "repeat"] = Field(
        "stop", description="When a mixed source runs out: stop the stream, drop it from the mixture, or repeat it (endless)."
    )
    max_documents: Optional[int] = Field(None, gt=0, description="Use only N train records in all (counted before cleaning, shared out over the slots; smoke runs).")
    on_bad_record: Literal["skip", "error"] = Field("skip", description="A bad record (invalid JSON/UTF-8, missing text, ragged row): drop and count it, or stop with an error.")
    max_record_bytes: int = Field(16 << 20, gt=0, description="Records (lines, rows, txt files) longer than this are bad records.")
    partition_bytes: Optional[int] = Field(
        None, ge=1024, description="Target size of a byte-range partition of a large file; None = all source bytes / 16384, between 4 KiB and 64 MiB (data/partitions.py)."
    )
    clean: CleanConfig = CleanConfig()
    seq_len: int = Field(512, ge=2, le=1_000_000, description="Tokens per packed sequence.")
    split_documents: bool = Field(True, description="Let a document continue into the next sequence; False = start it on a new one (pads).")
    doc_positions: bool = Field(False, description="Position ids restart at each document, so documents do not attend to each other (no attention_mask).")
    eos_token_id: Optional[int] = Field(None, ge=0, description="Separator after each document; None = the tokenizer's EOS (or SEP).")
    tokenize_batch: int = Field(64, gt=0, le=65_536, description="Documents per tokenizer call inside a worker.")
    emit_doc_ids: bool = Field(False, description="Add per-token doc_ids (global document index) to batches; pop it before the model.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per rank (tokenize and pack there).")
    sft: Optional[SftConfig] = Field(None, description="Supervised fine-tuning shaping (chat template, loss on responses only); set for task sft.")

    @model_validator(mode="after")
    def _one_validation(self) -> "StreamConfig":
        if self.validation_sources and self.holdout:
            raise ValueError("set either validation_sources or holdout, not both")
        return self


@dataclass(frozen=True)
class TaskSpec:
    """What a task declares for the config and for the code that never builds it (export, plan); tasks/ holds the rest."""

    data: type  # the model of the config's data: section
    metrics: tuple[str, ...]  # eval metrics that can select the best model
    best: str  # the default train.metric_for_best
    export: str  # the transformers Auto class of the exported model
    seq_len: str  # the config key that holds tokens per row (the memory plan's sequence length)

    @property
    def causal(self) -> bool:
        return self.export == "AutoModelForCausalLM"

    def seq_len_of(self, cfg: "Config") -> int:
        value: Any = cfg
        for part in self.seq_len.split("."):
            value = getattr(value, part)
        return value


TASK_SPECS: dict[str, TaskSpec] = {
    "classification": TaskSpec(DataConfig, ("eval/loss", "eval/accuracy", "eval/f1_macro"), "eval/accuracy",
                               "AutoModelForSequenceClassification", "model.max_length"),
    "causal_lm": TaskSpec(StreamConfig, ("eval/loss", "eval/perplexity"), "eval/loss", "AutoModelForCausalLM", "data.seq_len"),
    "sft": TaskSpec(StreamConfig, ("eval/loss", "eval/perplexity"), "eval/loss", "AutoModelForCausalLM", "data.seq_len"),
    "dpo": TaskSpec(PairsConfig, ("eval/loss", "eval/rewards/accuracy", "eval/rewards/margin"), "eval/loss", "AutoModelForCausalLM",
                    "data.dpo.max_length"),
}


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW decoupled weight decay (never on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup.")
    warmup_ratio: float = Field(0.06, ge=0, le=1, description="Warmup as a fraction of total optimizer steps.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio when set.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the global grad norm to this; None = no clipping.")


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0, le=10_000, description="Passes over the train data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(32, gt=0, le=65_536, description="Micro-batch per process.")
    eval_batch_size: int = Field(128, gt=0, le=65_536, description="Batch per process for eval.")
    grad_accum: int = Field(1, gt=0, le=4096, description="Micro-batches accumulated per optimizer step.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 where the device computes it natively (CUDA GPUs with bf16, CPUs with AVX512-BF16/AMX), else no; "
        "bf16, fp16 (GPU, loss scaling) or no (fp32)."
    )
    seed: int = Field(42, description="Seed for init, dropout and data order.")
    log_every: int = Field(10, gt=0, description="Optimizer steps between logged metrics.")
    eval_every: Optional[int] = Field(None, gt=0, description="Optimizer steps between evals; None = only at the end.")
    z_loss: float = Field(0.0, ge=0, description="LM only: add z_loss * mean(logsumexp(logits)^2) over labelled tokens (PaLM uses 1e-4).")
    eval_prompts: list[str] = Field([], description="LM only: prompts completed greedily at each eval, logged as a W&B table.")
    eval_on_start: bool = Field(False, description="Also evaluate the starting model (logged at step 0; not a best-model candidate).")
    metric_for_best: Optional[str] = Field(
        None, description="Metric for best-model selection and early stopping; None = the task's (eval/accuracy, LM tasks eval/loss)."
    )
    greater_is_better: Optional[bool] = Field(None, description="None = inferred (loss: lower is better).")
    early_stopping_patience: Optional[int] = Field(None, gt=0, description="Stop after N evals without improvement.")
    eval_batches: Optional[int] = Field(None, gt=0, description="Cap on eval batches per process (streams); None = the whole eval set.")
    save_every: Optional[int] = Field(None, gt=0, description="Optimizer steps between checkpoints; None = no checkpoints.")
    save_every_minutes: Optional[float] = Field(None, gt=0, description="Also checkpoint when this many minutes passed since the last save.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept: the newest N, plus the one saved at the best eval.")
    nonfinite_patience: int = Field(
        3, gt=0, description="NaN/Inf steps (each skipped) in a row before rolling back to the last good checkpoint."
    )
    resume: str = Field("auto", min_length=1, description="auto = newest complete checkpoint in output.dir, never, or a checkpoint path.")
    progress_bar: Literal["auto", "on", "off"] = Field("auto", description="auto = bar on a terminal, log lines otherwise.")

    # YAML 1.1 reads unquoted no/off/on as booleans; take them as the words the user wrote.
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_not_false(cls, v: Any) -> Any:
        return "no" if v is False else v

    @field_validator("progress_bar", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class TrackingConfig(_Section):
    report_to: list[Literal["wandb", "tensorboard"]] = Field(["wandb"], description="Where metrics go; [] = nowhere.")
    project: Optional[str] = Field(None, description="W&B project (default: WANDB_PROJECT or 'shardtune').")
    entity: Optional[str] = Field(None, description="W&B entity (default: WANDB_ENTITY).")
    run_name: Optional[str] = Field(None, description="Run name (default: WANDB_NAME or the run folder's name).")
    group: Optional[str] = Field(None, description="W&B group (default: WANDB_RUN_GROUP).")
    tags: list[str] = Field([], description="W&B tags (WANDB_TAGS, comma-separated, are added).")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online with an API key, offline otherwise (WANDB_MODE wins when set)."
    )
    init_timeout_s: float = Field(
        30, gt=0, description="Seconds an online W&B run may take to reach the server; past them the run logs offline (wandb sync it later)."
    )
    log_model: Literal["best", "final", "none"] = Field(
        "none", description="At the end, log the best or the final exported model as a W&B artifact of type model; none = no artifact."
    )

    @field_validator("log_model", mode="before")
    @classmethod
    def _none_is_the_word(cls, v: Any) -> Any:
        return "none" if v is None else v  # `tracking.log_model=none` on the command line arrives as None


STRATEGIES = ("cpu", "single_gpu", "ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp")


class DistConfig(_Section):
    strategy: Optional[Literal[STRATEGIES + ("auto",)]] = Field(
        None,
        description="How `shardtune launch` runs it: cpu, single_gpu, ddp, zero1/2/3, zero3_offload, fsdp, or auto "
        "(the fastest that fits by `shardtune plan`); None = ddp with GPUs, cpu without.",
    )
    timeout_minutes: float = Field(30, gt=0, description="Process-group timeout: a stuck collective fails after this.")
    term_grace_seconds: float = Field(
        20, gt=0, description="After SIGTERM, a rank that has not reached its next step boundary within this exits at once (a stuck rank must not outlive its job)."
    )


class OutputConfig(_Section):
    dir: Optional[str] = Field(None, description="Run folder; default runs/<config name>-<timestamp>.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty run folder.")


class Config(_Section):
    task: Literal["classification", "causal_lm", "sft", "dpo"] = Field(
        "classification", description="What to train (sft: causal LM on chat / prompt-response records, loss on responses only; dpo: preference pairs)."
    )
    model: ModelConfig = ModelConfig()
    data: Annotated[Union[DataConfig, StreamConfig, PairsConfig], Field(discriminator="kind")] = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    dist: DistConfig = DistConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _data_follows_task(cls, raw: Any) -> Any:
        """`data:` is the task's data model (TASK_SPECS): record files for classification, a stream for causal_lm/sft,
        preference pairs for dpo."""
        if isinstance(raw, dict) and isinstance(raw.get("data", {}), dict):
            spec = TASK_SPECS.get(raw.get("task", "classification"))
            if spec is not None:
                raw = {**raw, "data": {"kind": spec.data.model_fields["kind"].default, **raw.get("data", {})}}
        return raw

    @model_validator(mode="after")
    def _task_defaults(self) -> "Config":
        if isinstance(self.data, StreamConfig):
            if self.task == "sft" and self.data.sft is None:
                self.data.sft = SftConfig()
            elif self.task != "sft" and self.data.sft is not None:
                raise ValueError(f"data.sft applies to task sft only, but task is {self.task}; remove data.sft or set task: sft")
        if self.model.name_or_path is None and self.model.init == "pretrained":
            self.model.name_or_path = DEFAULT_MODELS[self.task]
        allowed = TASK_SPECS[self.task].metrics
        if self.train.metric_for_best is None:
            self.train.metric_for_best = TASK_SPECS[self.task].best
        elif self.train.metric_for_best not in allowed:
            raise ValueError(
                f"train.metric_for_best {self.train.metric_for_best!r} is not logged for task {self.task}; use one of {', '.join(allowed)}"
            )
        if self.task not in LM_TASKS and (self.train.z_loss or self.train.eval_prompts):
            raise ValueError("train.z_loss and train.eval_prompts apply to language-model tasks (causal_lm, sft), not classification")
        if self.model.init == "scratch" and not (self.model.preset or self.model.name_or_path):
            raise ValueError("model.init=scratch needs model.preset (e.g. tiny) or a model.name_or_path whose config to use")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or the defaults when path is None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return validate(raw)


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, raw)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file such as configs/quickstart.yaml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}; fix the syntax there.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML.") from None
    if data is None or data == {}:
        raise ConfigError(f"config file {path} holds no settings; start from configs/quickstart.yaml (a copy of it, or it with KEY=VALUE overrides).")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...), not a {type(data).__name__}.")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-5).")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    if value in ("None", "none"):  # Python spelling of YAML's null
        value = None
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section.")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- error text


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        for ann in get_args(field.annotation) or (field.annotation,):
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                keys += _valid_keys(ann, full + ".")
    return keys


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _explain(exc: ValidationError, raw: dict[str, Any]) -> str:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("files", "stream", "pairs"))))
    key = ".".join(str(p) for p in loc) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        guess = difflib.get_close_matches(key, _valid_keys(Config), n=1, cutoff=0.5)
        if guess and guess[0] == key:
            return f"config key {key} does not apply to task {raw.get('task', 'classification')}; remove it or change task."
        hint = f"did you mean {guess[0]}?" if guess else "see the config reference in README.md."
        return f"unknown config key {key}; {hint}"
    if kind == "value_error":
        return f"invalid config: {err['msg'].removeprefix('Value error, ')}."
    if kind == "missing":
        return f"config key {key} is required; add it to the config."
    value = _lookup(raw, loc)
    allowed = err["msg"][0].lower() + err["msg"][1:]
    return f"config key {key} has invalid value {value!r}: {allowed}."


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
