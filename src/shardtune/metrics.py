"""Classification metrics as sums (all-reduced over ranks, then divided): loss, accuracy, macro-F1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a padding row: no loss, no count


def classification_sums(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[loss sum, correct, count, tp per class, fp per class, fn per class] over the rows whose label is not IGNORE."""
    keep = labels != IGNORE
    logits, labels = logits[keep].float(), labels[keep]
    preds = logits.argmax(-1)
    classes = torch.arange(num_labels, device=labels.device)[:, None]
    hit_pred, hit_true = preds[None] == classes, labels[None] == classes
    return torch.cat([
        torch.stack([F.cross_entropy(logits, labels, reduction="sum") if len(labels) else logits.sum(),
                     (preds == labels).sum().float(), torch.tensor(float(len(labels)), device=labels.device)]),
        (hit_pred & hit_true).sum(1).float(), (hit_pred & ~hit_true).sum(1).float(), (~hit_pred & hit_true).sum(1).float(),
    ]).double()


def metrics_from_sums(sums: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Mean loss, accuracy and macro-F1 (classes absent from both predictions and labels are left out)."""
    loss, correct, n = sums[:3].tolist()
    tp, fp, fn = sums[3:].view(3, num_labels).tolist()
    f1s = [2 * t / (2 * t + p + f) for t, p, f in zip(tp, fp, fn) if t + p + f]
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "f1_macro": sum(f1s) / len(f1s) if f1s else 0.0}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    return metrics_from_sums(classification_sums(logits, labels, num_labels), num_labels)
