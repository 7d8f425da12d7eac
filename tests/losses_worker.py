"""Run under `torchrun --nproc-per-node 2` (gloo): the chunked LM head inside DDP, FSDP2 and DeepSpeed ZeRO-3.

Every rank builds the same tiny tied-embedding Llama and a batch of 4 rows; the
reference is the full-batch `model(..., labels=...).loss` gradient of one
unwrapped copy. Each strategy wraps a fresh copy with the chunked head installed
first, gives each rank 2 rows, and backpropagates the rank's loss sum scaled so
that the strategy's gradient average is the full batch's token mean. Rank 0
writes {strategy: {"loss": ..., "max_rel_diff": ..., "params": n}} to argv[2].

argv: TOKENIZER_DIR OUT_JSON STRATEGY[,STRATEGY...]
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from shardtune.losses import install_chunked_head


def build(tokenizer_dir: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    texts = ["a sharp, funny film", "the plot drags on and on without a point", "one of the year's best", "dull"]
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[1, :3] = -100
    return model, dict(batch), labels


def wrap(name: str, model):
    if name == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), lambda p: p.grad, lambda loss: loss.backward()
    if name == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, lambda p: p.grad.full_tensor(), lambda loss: loss.backward()
    if name == "zero3":
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**6}
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        return engine, safe_get_full_grad, engine.backward
    raise ValueError(name)


def run(name: str, base, batch, labels, reference) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = copy.deepcopy(base)
    head = install_chunked_head(model, chunk_tokens=5)
    names = [n for n, _ in model.named_parameters()]
    wrapped, full_grad, backward = wrap(name, model)
    rows = slice(rank * 2, rank * 2 + 2)
    mine = {k: v[rows] for k, v in batch.items()}
    total = (labels[:, 1:] != -100).sum()
    with head.loss_for(labels[rows]) as lm:
        out = wrapped(**mine)
    loss_sum, tokens = lm.result(out)
    backward(loss_sum * world / total)  # strategies average over ranks: this makes it sum / total tokens
    seen = torch.stack([loss_sum.detach(), tokens.float()])
    dist.all_reduce(seen)
    params = dict(model.named_parameters())
    worst = 0.0
    for n in names:
        g = full_grad(params[n]).detach().float()
        ref = reference[n]
        worst = max(worst, ((g - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item())
    return {"loss": (seen[0] / seen[1]).item(), "tokens": int(seen[1]), "max_rel_diff": worst, "params": len(names)}


def main() -> None:
    tokenizer_dir, out_path, strategies = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    dist.init_process_group("gloo")
    base, batch, labels = build(tokenizer_dir)
    ref_model = copy.deepcopy(base)
    ref_loss = ref_model(**batch, labels=labels).loss
    ref_loss.backward()
    reference = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    results = {"reference_loss": ref_loss.item()}
    for name in strategies:
        results[name] = run(name, base, batch, labels, reference)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
