"""Model FLOPs per token, peak FLOP/s per GPU, and model FLOPs utilization (MFU).

Convention (PaLM, Chowdhery et al. 2022, appendix B): a training step costs

    6N + 12·L·H·Q·T   FLOPs per token (forward + backward)

with N the non-embedding parameters, L layers, H attention heads, Q the head
dimension and T the sequence length. 6N counts the weight matmuls (2 FLOPs per
multiply-add, forward once, backward twice); 12·L·H·Q·T counts the attention
score and value matmuls, over the full T×T square (causal masking not
discounted). Rematerialization (gradient checkpointing) is not counted: MFU
measures useful model FLOPs, not hardware FLOPs.

N excludes the embedding *lookup* tables (token, position, token type): a
lookup does no multiply. The output projection (lm_head) is a real
vocab-sized matmul, so it counts in N whether or not its weight is tied to the
input embedding (the nanoGPT reading of appendix B). Everything else, norms and
biases included, counts (they are a rounding error next to the matmuls).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch


def flops_per_token(non_embedding_params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """6N + 12·L·H·Q·T: training (forward + backward) FLOPs per token."""
    return 6.0 * non_embedding_params + 12.0 * layers * heads * head_dim * seq_len


def non_embedding_params(model: torch.nn.Module) -> int:
    """N of a live (or meta-device) model: unique parameters minus the embedding tables, plus the output projection.

    A tied lm_head is added back once, since its matmul is real compute; an
    untied one was never subtracted (it is a Linear, not an Embedding).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    from shardtune.distributed.init import full_numel as numel

    n = sum(numel(p) for p in model.parameters() if id(p) not in embedding_ids)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and id(out.weight) in embedding_ids:
        n += numel(out.weight)
    return n


def _shape(config: Any) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of a Llama/BERT-like HF config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, head_dim


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a live model (its `.config` gives L, H, Q)."""
    layers, heads, head_dim = _shape(model.config)
    return flops_per_token(non_embedding_params(model), layers, heads, head_dim, seq_len)


_ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2")


def meta_model(config: Any) -> torch.nn.Module:
    """The model a config describes, on the meta device: shapes without memory or init time.

    A causal LM config (one AutoModelForCausalLM knows) gets its LM head; any
    other config (BERT-like encoders) gets the bare AutoModel.
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type in _ENCODERS and not getattr(config, "is_decoder", False):
        causal = False  # they register an LM-head class too, but are trained here as encoders
    auto = AutoModelForCausalLM if causal else AutoModel
    with torch.device("meta"):
        return auto.from_config(config)


def config_flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token of the model an HF config (Llama/BERT-like) describes, counted on the meta device."""
    return model_flops_per_token(meta_model(config), seq_len)


# Dense (no 2:4 sparsity) BF16/FP16 tensor-core peaks, FLOP/s. Sources: the NVIDIA
# datasheets quote "with sparsity" figures; dense is half of those.
#   A100 (all SXM4/PCIe, 40/80 GB): "NVIDIA A100 Tensor Core GPU" datasheet, BF16/FP16 312 TFLOPS.
#   H100 SXM: "NVIDIA H100 Tensor Core GPU" datasheet, 1,979 TFLOPS sparse -> 989.
#   H100 PCIe: same datasheet, 1,513 TFLOPS sparse -> 756.
#   H200 (SXM): "NVIDIA H200 Tensor Core GPU" datasheet, 1,979 TFLOPS sparse -> 989.
#   L40S: "NVIDIA L40S GPU" datasheet, 733 TFLOPS sparse -> 362.
#   A10: "NVIDIA A10 Tensor Core GPU" datasheet, BF16/FP16 125 TFLOPS dense (250 sparse).
#   RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper, FP16/BF16 with FP32 accumulate
#     (what PyTorch uses) 165.2 TFLOPS dense.
# Left out on purpose (not confident of a datasheet figure for the exact part): A10G
# (an AWS-specific part), H100 NVL, H200 NVL, L40, consumer cards other than the 4090.
PEAK_FLOPS_16BIT: dict[str, float] = {
    "A100": 312e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "L40S": 362e12,
    "A10": 125e12,
    "RTX 4090": 165.2e12,
}

# torch.cuda.get_device_name() strings -> table keys. Order matters: the first
# match wins, and unknown variants (NVL, A10G, L40 without S) must match nothing.
_NAME_PATTERNS: list[tuple[str, Optional[str]]] = [
    (r"\bNVL\b", None),
    (r"\bA100\b", "A100"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b.*(\bSXM|\bHBM3)", "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bH200\b", "H200"),
    (r"\bL40S\b", "L40S"),
    (r"\bA10\b", "A10"),
    (r"\bRTX 4090\b", "RTX 4090"),
]


def gpu_model(device_name: str) -> Optional[str]:
    """The PEAK_FLOPS_16BIT key for a torch.cuda.get_device_name() string, or None when not in the table."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return key
    return None


def peak_flops(device_name: Optional[str], dtype: str) -> Optional[float]:
    """Dense peak FLOP/s of one GPU for bf16/fp16 training; None on CPU, for unknown GPUs, and for fp32.

    `dtype` is a train.mixed_precision value ("bf16", "fp16", "no") or a torch
    dtype name. fp32 ("no") has no entry: without TF32 (off by default for
    matmuls in PyTorch) it runs on the CUDA cores, a different, much lower peak.
    """
    if not device_name or device_name.lower() in ("cpu", "mps"):
        return None
    if str(dtype).removeprefix("torch.") not in ("bf16", "fp16", "bfloat16", "float16", "half"):
        return None
    key = gpu_model(device_name)
    return PEAK_FLOPS_16BIT.get(key) if key else None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s of one device over its peak (0..1)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s_per_device * flops_per_token / peak
