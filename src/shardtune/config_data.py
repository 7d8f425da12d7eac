"""The data sections of the config tree (config.py re-exports them): classification files, the stream, pairs.

A leaf like config.py: pydantic models only, with a default and a one-line doc per field.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
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


class SourceSpec(Section):
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


class CleanConfig(Section):
    nfc: bool = Field(True, description="Normalize text to Unicode NFC (composed characters).")
    strip_control: bool = Field(True, description="Remove control characters (NUL, escapes, C1) except tab and newlines.")
    min_chars: int = Field(1, ge=1, description="Drop documents with fewer non-space characters (1 = drop only empty ones).")
    max_chars: Optional[int] = Field(None, gt=0, description="Documents longer than this (characters) are handled by too_long; None = no limit.")
    too_long: Literal["split", "truncate", "drop"] = Field("split", description="Too-long documents: split into max_chars pieces, truncate, or drop.")
    dedup: bool = Field(False, description="Drop exact duplicates (by hash of the cleaned text) within each partition; see data/docstream.py for the cost.")


class SftConfig(Section):
    format: Literal["auto", "chat", "prompt_response"] = Field(
        "auto", description="Record shape: chat (a messages list), prompt_response (two text fields), or auto (per record, by which field it has)."
    )
    messages_field: str = Field("messages", min_length=1, description="Field holding the chat turns [{role, content}, ...].")
    prompt_field: str = Field("prompt", min_length=1, description="Field holding the prompt (prompt_response records).")
    response_field: str = Field("response", min_length=1, description="Field holding the response (prompt_response records).")
    too_long: Literal["drop", "truncate"] = Field("drop", description="An example longer than seq_len: drop and count it, or cut the response's tail.")


class DpoConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference (rewards are beta * log-ratio).")
    prompt_field: str = Field("prompt", min_length=1, description="Field holding the prompt (text or chat turns); absent = the chosen and rejected conversations' shared first turns.")
    chosen_field: str = Field("chosen", min_length=1, description="Field holding the preferred response (text, or assistant turns / a whole conversation).")
    rejected_field: str = Field("rejected", min_length=1, description="Field holding the dispreferred response (same forms as chosen).")
    max_length: int = Field(512, ge=2, le=1_000_000, description="Tokens per chosen or rejected sequence (prompt + response).")
    too_long: Literal["drop", "truncate"] = Field("drop", description="A pair with a side longer than max_length: drop and count it, or cut the responses' tails.")


class PairsConfig(Section):
    kind: Literal["pairs"] = Field("pairs", description="Preference pairs held in memory (set from task dpo).")
    train_file: str = Field(..., min_length=1, description="JSONL/JSON/parquet file of preference records (prompt/chosen/rejected or chat pairs).")
    validation_file: Optional[str] = Field(None, description="Held-out pairs (same forms); None = a seeded hold-out of the train pairs.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Hold-out fraction for validation when no file is given.")
    split_seed: int = Field(42, description="Seed of the hold-out split (independent of train.seed).")
    max_examples: Optional[int] = Field(None, gt=0, description="Use only the first N train records (smoke runs).")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes.")
    clean: CleanConfig = CleanConfig()
    dpo: DpoConfig = DpoConfig()


class RewardSpec(Section):
    name: str = Field(..., min_length=1, description="exact_match, format, length_penalty, or a user reward as module:function.")
    weight: float = Field(1.0, description="Weight of this reward in the sum the advantages come from.")
    options: dict = Field({}, description="Keyword options of the reward (e.g. answer_key, pattern, target).")


class GrpoConfig(Section):
    prompt_field: str = Field("prompt", min_length=1, description="Field holding the prompt (text, or chat turns).")
    chat_template: bool = Field(True, description="Wrap a text prompt as a user turn in the tokenizer's chat template, when it has one.")
    max_prompt_length: int = Field(256, ge=1, le=1_000_000, description="Prompt tokens kept (the prompt's tail when longer).")
    num_generations: int = Field(4, ge=2, le=256, description="Completions sampled per prompt (the group G).")
    max_new_tokens: int = Field(32, ge=1, le=100_000, description="Completion tokens at most (EOS ends one sooner).")
    stop: list[str] = Field([], description="Stop strings: a completion ends at the token that completes one (e.g. </answer>).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (and of the log-probs, as TRL).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    beta: float = Field(0.0, ge=0, description="KL weight against the frozen reference (0 = no reference model).")
    epsilon: float = Field(0.2, gt=0, description="Lower clip of the importance ratio (1 - epsilon).")
    epsilon_high: Optional[float] = Field(None, gt=0, description="Upper clip (1 + epsilon_high); None = epsilon.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description="Loss aggregation: grpo per sequence, bnpo/dapo per token, dr_grpo per max_new_tokens.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide each group's centred rewards by the std of its group, of the whole step's rewards (batch: every rank's), or not (none).")
    rewards: list[RewardSpec] = Field([RewardSpec(name="exact_match")], min_length=1, description="Reward functions, summed with weights.")


class PromptsConfig(Section):
    kind: Literal["prompts"] = Field("prompts", description="Prompt records held in memory (set from task grpo).")
    train_file: str = Field(..., min_length=1, description="JSONL/JSON/CSV/parquet file of prompt records (the prompt and what the rewards read, e.g. answer).")
    validation_file: Optional[str] = Field(None, description="Held-out prompts (same form); None = a seeded hold-out of the train prompts.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Hold-out fraction for validation when no file is given.")
    split_seed: int = Field(42, description="Seed of the hold-out split (independent of train.seed).")
    max_examples: Optional[int] = Field(None, gt=0, description="Use only the first N train prompts (smoke runs).")
    max_eval_examples: Optional[int] = Field(None, gt=0, description="Evaluate on the first N held-out prompts only.")
    grpo: GrpoConfig = GrpoConfig()


class StreamConfig(Section):
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
