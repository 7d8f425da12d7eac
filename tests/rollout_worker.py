"""Run under `torchrun --nproc-per-node 2` (gloo): generation under a sharded strategy (`Strategy.generating`).

A tiny Llama (the suite's tokenizer) is built from one seed on every rank and prepared by shardtune's own strategy
(argv[3]: zero3 or fsdp). Each rank then generates greedily for the same 3 left-padded prompts, twice: with the
parameters whole for the rollout (`strategy.generating()`), and the way a sharded model generates without it
(the wrapped model, `synced_gpus`, as the eval-prompt generations do). Rank 0 writes, per max_new_tokens (4 and
16), the all-gather calls each rollout made on this rank and the tokens, and the unsharded model's tokens.

argv: TOKENIZER_DIR OUT_JSON STRATEGY
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "allgather_fn", "all_gather_coalesced")


def count_gathers():
    """Wrap the all-gathers of torch.distributed (FSDP2) and of deepspeed.comm (ZeRO-3: on CPU DeepSpeed talks
    through its own comm layer) with one counter; a gather that calls another counts twice, alike in both arms."""
    import deepspeed.comm

    counter = {"n": 0}
    for module in (dist, deepspeed.comm):
        for name in GATHERS:
            real = getattr(module, name, None)
            if real is None:
                continue

            def wrapped(*a, _real=real, **k):
                counter["n"] += 1
                return _real(*a, **k)

            setattr(module, name, wrapped)
    return counter


def main(tok_dir: str, out: str, name: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shardtune.config import validate
    from shardtune.distributed import build_strategy

    tok = AutoTokenizer.from_pretrained(tok_dir, padding_side="left")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id))
    reference = copy.deepcopy(model).eval()
    cfg = validate({"task": "causal_lm", "model": {"name_or_path": tok_dir, "init": "scratch", "preset": "tiny"},
                    "data": {"sources": [{"path": tok_dir}]}, "dist": {"strategy": name}, "train": {"mixed_precision": "no"}})
    if name == "zero3":  # every parameter partitioned: ZeRO-3 keeps ones under its persistence threshold (all of a tiny model) whole
        from shardtune.distributed import zero

        ds = json.loads(Path(zero.deepspeed_config_path(name)).read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = Path(out).with_name(f"ds-{dist.get_rank() if dist.is_initialized() else os.environ['RANK']}.json")
        path.write_text(json.dumps(ds))
        zero.deepspeed_config_path = lambda _: str(path)
    strategy = build_strategy(cfg)
    strategy.prepare(model)
    counter = count_gathers()
    batch = tok(["the film is", "a story about a", "dull"], return_tensors="pt", padding=True)
    result = {}
    for new in (4, 16):
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        counter["n"] = 0
        with strategy.generating() as m:
            whole = m.generate(**batch, **kw)
        whole_gathers = counter["n"]
        counter["n"] = 0
        naive = strategy.unwrapped().generate(**batch, synced_gpus=True, **kw)
        result[new] = {"whole": whole.tolist(), "whole_gathers": whole_gathers, "naive": naive.tolist(),
                       "naive_gathers": counter["n"], "reference": reference.generate(**batch, **kw).tolist()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    strategy.end()


if __name__ == "__main__":
    main(*sys.argv[1:4])
