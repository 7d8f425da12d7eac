"""Eval metrics, reduced over every rank's share of the eval set."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Mean loss, accuracy and macro-F1 (classes absent from both preds and labels are left out)."""
    loss = F.cross_entropy(logits.float(), labels).item()
    preds = logits.argmax(-1)
    f1s = []
    for c in range(num_labels):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "loss": loss,
        "accuracy": (preds == labels).float().mean().item(),
        "f1_macro": sum(f1s) / len(f1s) if f1s else 0.0,
    }


@torch.no_grad()
def evaluate(acc, model, loader, num_labels: int, prefix: str) -> dict[str, float]:
    """Metrics over the whole eval set: every rank's part, duplicates from even batching dropped."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**batch).logits
        logits, labels = acc.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    m = classification_metrics(torch.cat(all_logits), torch.cat(all_labels), num_labels)
    return {f"{prefix}/{k}": v for k, v in m.items()}
