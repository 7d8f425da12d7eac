"""Causal-LM cross entropy from the last hidden states, in chunks: the batch's logits never exist whole.

A step over B x T tokens with a V-word vocabulary normally materializes B x T x V
logits (and as much again for their gradient): for SmolLM2 at 2 x 2048 that is
4,096 x 49,152 fp32 values, 805 MB each, the largest allocation of the step.
`ChunkedLMHead` replaces the model's output embedding (`lm_head`) and, while a
loss context is active, computes the token-summed next-token cross entropy
(plus an optional z-loss) inside its own forward, a chunk of tokens at a time.
The gradients with respect to the hidden states and the weight are computed in
the same pass, chunk by chunk (Liger's fused linear cross entropy does the
same on GPU with Triton kernels), so backward only scales them.

Why inside the head's forward: DeepSpeed ZeRO-3 gathers, and FSDP2 unshards,
a module's parameters only around that module's own forward, and both hook the
module's *outputs* to re-gather / unshard for backward. So the head returns the
loss sum itself in place of logits; HF's `LlamaForCausalLM.forward` passes it
through as `out.logits` (transformers 5.24: `logits = self.lm_head(hidden)`
with `logits_to_keep=0`, i.e. every position), and the task must take the loss
from `out.logits` (the tensor the wrappers hooked), not from a side channel.

Usage (the task, once per micro-batch; `model` may be wrapped):

    head = install_chunked_head(model)            # once, before accelerate.prepare / deepspeed / fully_shard
    with head.loss_for(batch["labels"], z_loss=cfg.train.z_loss) as lm:
        out = model(input_ids=..., attention_mask=..., position_ids=...)   # no labels=
    loss_sum, tokens = lm.result(out)             # sum over label tokens, and their count

Without a context the head is a plain `F.linear`: generation, eval through
`model(**batch).loss`, export and every other caller see normal logits.

Written by hand (not Liger) because Liger's kernels are Triton/CUDA-only and
nothing else in the stack offers a chunked, exact-gradient linear+CE on CPU.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from shardtune import ShardtuneError

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk: 341 tokens at SmolLM2's 49,152-word vocabulary


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is labels[t+1] (as HF's ForCausalLMLoss); the last position has none."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def loss_backend(device: torch.device, requested: str = "auto") -> str:
    """Which implementation computes the loss: "liger" (Liger's fused linear cross entropy, Triton, CUDA only)
    or "chunked" (this module's PyTorch code, any device).

    auto picks liger on CUDA where `liger_kernel` is installed. The liger path is untested on the CPU-only
    build machine: it is a small, separate function (`_liger_loss`) so that it can be checked, or switched
    off with requested="chunked", on a GPU.
    """
    have = importlib.util.find_spec("liger_kernel") is not None
    if requested == "chunked":
        return "chunked"
    if requested == "liger":
        if not have or torch.device(device).type != "cuda":
            raise ShardtuneError("the liger loss backend needs a CUDA GPU and `pip install liger-kernel`; use the chunked backend.")
        return "liger"
    if requested != "auto":
        raise ShardtuneError(f"unknown loss backend {requested!r}; choose auto, chunked or liger.")
    return "liger" if have and torch.device(device).type == "cuda" else "chunked"


def _compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The matmul dtype: autocast's where autocast is on, else the weight's."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def _chunk_grad(logprobs: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    """d(ce + z_loss * lse^2)/d(logits) per row, in place over `logprobs`: softmax * (1 + 2 z lse) - onehot."""
    probs = logprobs.exp_()
    if z_loss:
        probs.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    probs[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return probs


def _loss_and_grads(hidden, weight, bias, targets, z_loss: float, chunk: int, dtype: torch.dtype, need: tuple[bool, bool, bool]):
    """sum over rows of CE(hidden @ weight.T + bias, targets) + z_loss * lse^2, the sum of lse^2, and (where `need`
    says) the gradients w.r.t. hidden, weight and bias: matmuls in `dtype`, softmax and sums in fp32."""
    need_h, need_w, need_b = need
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # softmax and sums: fp32 at least
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    # a low-precision weight gradient per chunk lands in one reused buffer and is added to the fp32 sum in place:
    # no chunk allocates a weight-sized product and an fp32 copy of it (the same values, bit for bit)
    w_chunk = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_w and dtype != acc else None
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    lse_sq = torch.zeros((), dtype=acc, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk].to(dtype), targets[s : s + chunk]
            logits = F.linear(h, w, b).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            logprobs = logits.sub_(lse[:, None])  # in place: one chunk-sized buffer
            sq = lse.pow(2).sum()
            loss -= logprobs.gather(1, y[:, None]).sum()
            loss += z_loss * sq
            lse_sq += sq
            if not any(need):
                continue
            g = _chunk_grad(logprobs, lse, y, z_loss)
            if need_b:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if need_h:
                grad_h[s : s + chunk] = g @ w
            if need_w and dtype == acc:
                grad_w.addmm_(g.t(), h)
            elif need_w:
                grad_w += torch.mm(g.t(), h, out=w_chunk)
    return loss, lse_sq, (grad_h, grad_w, grad_b)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """_loss_and_grads as an autograd Function: the gradients are made in forward, backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, z_loss: float, chunk: int, dtype: torch.dtype):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, lse_sq, grads = _loss_and_grads(hidden, weight, bias, targets, z_loss, chunk, dtype, need)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.used = False
        ctx.mark_non_differentiable(lse_sq)
        return loss, lse_sq

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse_sq):
        if ctx.used:
            raise RuntimeError("the chunked LM loss precomputes its gradients and supports one backward pass only")
        ctx.used = True
        scaled = [g.mul_(grad_loss).to(dt) if g is not None else None for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return *scaled, None, None, None, None


def chunked_cross_entropy(hidden, weight, bias, labels, z_loss: float = 0.0, chunk_tokens: Optional[int] = None, shifted: bool = False):
    """(loss_sum, tokens, lse_sq_sum) of next-token CE over `labels` (B x T, -100 ignored; shifted here unless
    `shifted`: then labels[t] is already position t's target, as for a sequence-parallel chunk) from hidden states
    B x T x H, chunk by chunk. Only rows with a target reach the matmul; without grad mode (eval) no gradient is
    computed."""
    targets = (labels if shifted else shift_labels(labels)).reshape(-1)
    valid = targets != IGNORE_INDEX
    tokens = valid.sum()
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = valid.nonzero().squeeze(1)  # one host sync per call; pays off for SFT's mostly-ignored rows
    if keep.numel() < flat.shape[0]:
        flat, targets = flat[keep], targets[keep]
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    dtype = _compute_dtype(hidden.device.type, weight.dtype)
    if not torch.is_grad_enabled():
        loss, lse_sq, _ = _loss_and_grads(flat, weight, bias, targets, float(z_loss), chunk, dtype, (False, False, False))
        return loss, tokens, lse_sq
    loss, lse_sq = _ChunkedCrossEntropy.apply(flat, weight, bias, targets, float(z_loss), chunk, dtype)
    return loss, tokens, lse_sq


def _liger_loss(hidden, weight, bias, labels, z_loss: float, shifted: bool = False):
    """(loss_sum, tokens, None) through Liger's fused linear cross entropy (CUDA). Not run on the CPU build machine."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    targets = (labels if shifted else shift_labels(labels)).reshape(-1)
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, lse_square_scale=float(z_loss), reduction="sum")
    loss = fn(weight, hidden.reshape(-1, hidden.shape[-1]), targets, bias)
    return loss, (targets != IGNORE_INDEX).sum(), None


class LMLoss:
    """One forward's loss request and, once the head has run, its result."""

    def __init__(self, labels: torch.Tensor, z_loss: float, chunk_tokens: Optional[int], backend: str, shifted: bool = False):
        self.labels, self.z_loss, self.chunk_tokens, self.backend, self.shifted = labels, z_loss, chunk_tokens, backend, shifted
        self.loss_sum: Optional[torch.Tensor] = None
        self.tokens: Optional[torch.Tensor] = None  # 0-dim int64: label tokens (shifted targets) in the micro-batch
        self.lse_sq_sum: Optional[torch.Tensor] = None  # detached sum of logsumexp^2, for logging the z-loss

    def compute(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.loss_sum is not None:
            raise RuntimeError("the LM head ran twice inside one loss_for context; open one context per forward")
        if hidden.shape[:-1] != self.labels.shape:
            raise RuntimeError(
                f"the LM head got hidden states {tuple(hidden.shape)} for labels {tuple(self.labels.shape)}: "
                "call the model with every position (logits_to_keep=0) and the same batch as the labels"
            )
        labels = self.labels.to(hidden.device)
        if self.backend == "liger":
            self.loss_sum, self.tokens, self.lse_sq_sum = _liger_loss(hidden, weight, bias, labels, self.z_loss, self.shifted)
        else:
            self.loss_sum, self.tokens, self.lse_sq_sum = chunked_cross_entropy(hidden, weight, bias, labels, self.z_loss, self.chunk_tokens, self.shifted)
        return self.loss_sum

    def result(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum, tokens) from the model's output: the loss sum is `out.logits`, the tensor that DeepSpeed's and
        FSDP2's output hooks saw (they re-gather / unshard the head's weight for backward)."""
        if self.loss_sum is None:
            raise RuntimeError("the model's forward never called the chunked LM head inside loss_for")
        logits = out.logits if hasattr(out, "logits") else out
        if logits.dim() != 0:
            raise RuntimeError(f"expected the loss sum as out.logits, got a tensor of shape {tuple(logits.shape)}")
        return logits, self.tokens


class ChunkedLMHead(nn.Module):
    """An output embedding that holds the replaced Linear's own weight Parameter (tied stays tied; the state-dict
    key stays `lm_head.weight`) and computes the LM loss in chunks while `loss_for` is active."""

    def __init__(self, head: nn.Linear, chunk_tokens: Optional[int] = None, backend: str = "chunked"):
        super().__init__()
        self.weight = head.weight
        self.register_parameter("bias", head.bias)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.chunk_tokens, self.backend = chunk_tokens, backend
        self._pending: Optional[LMLoss] = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"

    @contextmanager
    def loss_for(self, labels: torch.Tensor, z_loss: float = 0.0, chunk_tokens: Optional[int] = None, shifted: bool = False) -> Iterator[LMLoss]:
        """While open, the next forward returns the loss sum (a 0-dim tensor) instead of logits; `shifted`: labels[t]
        is already position t's target."""
        if self._pending is not None:
            raise RuntimeError("loss_for contexts do not nest")
        self._pending = LMLoss(labels, z_loss, chunk_tokens or self.chunk_tokens, self.backend, shifted)
        try:
            yield self._pending
        finally:
            self._pending = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            return F.linear(hidden, self.weight, self.bias)
        return self._pending.compute(hidden, self.weight, self.bias)


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def install_chunked_head(model, chunk_tokens: Optional[int] = None, backend: str = "auto") -> ChunkedLMHead:
    """Replace `model`'s output embedding by a ChunkedLMHead sharing its weight; returns the head (idempotent).

    Install after any resize_token_embeddings (which builds a new Linear) and before accelerate.prepare,
    deepspeed.initialize or fully_shard (their hooks must see the new module).
    """
    head = model.get_output_embeddings()
    if isinstance(head, ChunkedLMHead):
        return head
    cfg = getattr(model, "config", None)
    scaled = [k for k in _LOGIT_TRANSFORMS if getattr(cfg, k, None) not in (None, 0, 1, 1.0)]
    if scaled:
        raise ShardtuneError(
            f"this model transforms its logits after the LM head ({', '.join(scaled)}), which the chunked loss does not "
            "reproduce; turn the chunked loss off for it."
        )
    if type(head) is not nn.Linear:
        raise ShardtuneError(
            f"the chunked loss needs the model's output embedding to be a plain nn.Linear, not {type(head).__name__}; "
            "turn the chunked loss off for this model (or do not wrap lm_head in LoRA / modules_to_save)."
        )
    device = head.weight.device if head.weight.device.type != "meta" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    new = ChunkedLMHead(head, chunk_tokens, loss_backend(device, backend))
    model.set_output_embeddings(new)
    if model.get_output_embeddings() is not new:
        raise RuntimeError(f"{type(model).__name__}.set_output_embeddings did not install the chunked head")
    return new
