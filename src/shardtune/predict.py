"""`shardtune predict`: label and class probabilities for texts, from a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shardtune import ShardtuneError
from shardtune.checkpoint import MODEL_DIR


def load_for_predict(run_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = run_dir / MODEL_DIR if (run_dir / MODEL_DIR).is_dir() else run_dir
    if not (model_dir / "config.json").is_file():
        raise ShardtuneError(f"{run_dir} holds no trained model (no {MODEL_DIR}/config.json); pass a run folder written by `shardtune train`.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return model, tokenizer


@torch.no_grad()
def predict(run_dir: Path, texts: list[str], batch_size: int = 64, max_length: int = 512) -> list[dict]:
    model, tokenizer = load_for_predict(run_dir)
    id2label = model.config.id2label
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        probs = model(**enc).logits.float().softmax(-1)
        for text, p in zip(chunk, probs):
            scores = {id2label[j]: round(float(v), 4) for j, v in enumerate(p)}
            out.append({"text": text, "label": id2label[int(p.argmax())], "probs": scores})
    return out


def read_texts(path: Path, column: str) -> list[str]:
    from shardtune.data.records import read_records

    texts = []
    for where, rec in read_records(path):
        if not isinstance(rec.get(column), str):
            raise ShardtuneError(f"{where}: no text in column {column!r}; pass --column with the text column's name.")
        texts.append(rec[column])
    return texts


def format_prediction(p: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(p, ensure_ascii=False)
    scores = " ".join(f"{k}={v:.3f}" for k, v in p["probs"].items())
    text = p["text"] if len(p["text"]) <= 60 else p["text"][:57] + "..."
    return f"{p['label']}\t{scores}\t{text}"
