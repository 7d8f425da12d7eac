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
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from shardtune import ShardtuneError


class ConfigError(ShardtuneError):
    pass


from shardtune.config_data import (  # noqa: E402,F401  (the data sections, re-exported: `from shardtune.config import StreamConfig`)
    CleanConfig,
    DataConfig,
    DpoConfig,
    GrpoConfig,
    PairsConfig,
    PromptsConfig,
    RewardSpec,
    Section as _Section,
    SftConfig,
    SourceSpec,
    StreamConfig,
)


LM_TASKS = ("causal_lm", "sft")
DEFAULT_MODELS = {"classification": "minilm-l6", "causal_lm": "smollm2-135m", "sft": "smollm2-135m", "dpo": "smollm2-135m", "grpo": "smollm2-135m"}


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
    "grpo": TaskSpec(PromptsConfig, ("eval/reward",), "eval/reward", "AutoModelForCausalLM", "data.grpo.max_new_tokens"),
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
        "auto", description="auto = bf16 where the device computes it natively (CUDA GPUs with bf16; CPUs with AVX512-BF16/AMX whose "
        "measured bf16 matmul peak beats fp32 by 1.2x), else no; "
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
    eval_batches: Optional[int] = Field(None, gt=0, description="Cap on eval batches over all data-parallel ranks (streams), the same on any layout; None = the whole eval set.")
    save_every: Optional[int] = Field(None, gt=0, description="Optimizer steps between checkpoints; None = no checkpoints.")
    save_every_minutes: Optional[float] = Field(None, gt=0, description="Also checkpoint when this many minutes passed since the last save.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept: the newest N, plus the one saved at the best eval.")
    async_save: bool = Field(
        True, description="DDP/FSDP2: write periodic checkpoints in the background (staged in host memory), sealed once every rank's files "
        "are on disk; a stop signal's save and ZeRO's saves are synchronous."
    )
    nonfinite_patience: int = Field(
        3, gt=0, description="NaN/Inf steps (each skipped) in a row before rolling back to the last good checkpoint."
    )
    resume: str = Field("auto", min_length=1, description="auto = newest complete (sealed) checkpoint in output.dir, never, or a checkpoint path or URL.")
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


class MeshConfig(_Section):
    """The run's device mesh: data-parallel replicate x data-parallel shard x context (sequence) x tensor = the world size."""

    dp_replicate: int = Field(1, ge=1, description="Data-parallel replicas (HSDP across nodes when dp_shard > 1): gradients all-reduced between them.")
    dp_shard: int = Field(-1, ge=-1, description="Data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2); -1 = whatever the other axes leave.")
    tp: int = Field(1, ge=1, description="Tensor parallelism: each block's matmuls split over this many ranks (within a node).")
    sp: int = Field(1, ge=1, description="Sequence parallelism (Ulysses, all-to-all over heads): each rank holds 1/sp of every sequence.")
    cp: int = Field(1, ge=1, description="Context parallelism (ring attention; CUDA only): each rank holds 1/cp of every sequence.")
    allow_tp_across_nodes: bool = Field(False, description="Let tp exceed the GPUs of one node (slow: TP all-reduces every layer).")

    @field_validator("dp_shard")
    @classmethod
    def _fill_or_positive(cls, v: int) -> int:
        if v == 0:
            raise ValueError("dp_shard must be -1 (fill) or at least 1")
        return v

    @property
    def is_default(self) -> bool:
        return (self.dp_replicate, self.dp_shard, self.tp, self.sp, self.cp) == (1, -1, 1, 1, 1)


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
    mesh: MeshConfig = Field(MeshConfig(), description="Named device-mesh axes (README, 'The device mesh'); the default is one data-parallel axis.")


class OutputConfig(_Section):
    dir: Optional[str] = Field(None, description="Run folder, local or an object-store URL (s3://bucket/runs/x); default runs/<config name>-<timestamp>.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty run folder.")
    staging: Optional[str] = Field(None, description="Local folder of a run whose dir is a URL (checkpoints are written here, then uploaded); default .staging/<bucket>/<path>.")


class Config(_Section):
    task: Literal["classification", "causal_lm", "sft", "dpo", "grpo"] = Field(
        "classification", description="What to train (sft: causal LM on chat / prompt-response records, loss on responses only; dpo: preference pairs; "
        "grpo: online RL on prompts with verifiable rewards)."
    )
    model: ModelConfig = ModelConfig()
    data: Annotated[Union[DataConfig, StreamConfig, PairsConfig, PromptsConfig], Field(discriminator="kind")] = DataConfig()
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
