"""DPO feasibility on this CPU: SmolLM2-135M + LoRA on data/pydocs-faq-dpo.jsonl, in a plain torch loop.

Before `task: dpo` exists in the Trainer, this checks that the shipped
config's recipe (configs/smollm2-dpo-lora.yaml) can raise held-out
rewards/accuracy from 0.5 to >= 0.9 in minutes on a 2-core CPU. It uses the
same pieces the task uses (data.dpo pairs and collate, dpo_loss, dpo_model's
policy and adapter-disabled reference log-probs), with AdamW, linear warmup,
grad clipping at 1.0 and a seeded hold-out of whole pairs. It prints the
held-out metrics at step 0 and every --eval-every steps, with wall and
process CPU minutes (the machine is shared: CPU time / threads is closer to
an idle machine's wall time). The held-out reference log-probs are computed
once and reused (they do not change under LoRA); --kind other builds the
pairs with another question's answer as rejected (data/make_pydocs_dpo.py).

    PYTHONPATH=src python bench/dpo_feasibility.py --batch 2 --lr 1e-3 --max-steps 8
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data"))


def args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=15, help="stop after this much wall time")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--holdout", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kind", choices=["shuffled", "other"], default="shuffled")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def main() -> None:
    a = args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import make_pydocs_dpo

    from shardtune.config import DpoConfig, LoraConfig, ModelConfig
    from shardtune.data.dpo import collate_pairs, pair_ids
    from shardtune.dpo_loss import dpo_loss, reward_sums
    from shardtune.dpo_model import pair_logps, reference_logps
    from shardtune.models import load_causal_lm, load_tokenizer

    make_pydocs_dpo.REJECTED_KIND = a.kind
    lora = LoraConfig(r=a.r, alpha=2 * a.r, dropout=0.0, target_modules=a.targets.split(","))
    mc = ModelConfig(name_or_path="smollm2-135m", lora=lora)
    tok = load_tokenizer(mc)
    model = load_causal_lm(mc, tok)
    pairs = [pair_ids(r, tok, DpoConfig(beta=a.beta, max_length=a.max_length)) for r in make_pydocs_dpo.build()]
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    held, train = [pairs[i] for i in order[: a.holdout]], [pairs[i] for i in order[a.holdout :]]
    print(f"pairs {len(pairs)}: train {len(train)}, held out {len(held)}; {vars(a)}", flush=True)

    held_batches = [collate_pairs(held[i : i + 4], tok.pad_token_id) for i in range(0, len(held), 4)]
    held_refs = [reference_logps(model, b) for b in held_batches]

    def evaluate() -> dict[str, float]:
        model.eval()
        tot, n = {}, 0
        with torch.no_grad():
            for b, ref in zip(held_batches, held_refs):
                out = dpo_loss(*pair_logps(model, b), *ref, a.beta)
                sums, k = reward_sums(out)
                n += k
                for key, v in {**sums, "loss": out.losses.sum()}.items():
                    tot[key] = tot.get(key, 0.0) + v.item()
        model.train()
        return {k: v / n for k, v in tot.items()}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))
    t0, rng, queue, step = time.time(), random.Random(1), [], 0

    def report(extra: str = "") -> None:
        m = evaluate()
        print(f"step {step:3d}  wall {(time.time() - t0) / 60:5.1f} min  cpu {time.process_time() / 60:5.1f} min{extra}  |  held-out "
              f"accuracy {m['rewards/accuracy']:.3f}  margin {m['rewards/margin']:+.3f}  chosen {m['rewards/chosen']:+.3f}  "
              f"rejected {m['rewards/rejected']:+.3f}  loss {m['loss']:.3f}", flush=True)

    report()
    while step < a.max_steps and time.time() - t0 < a.minutes * 60:
        if len(queue) < a.batch:
            more = list(range(len(train)))
            rng.shuffle(more)
            queue += more
        batch = collate_pairs([train[i] for i in queue[: a.batch]], tok.pad_token_id)
        queue = queue[a.batch :]
        out = dpo_loss(*pair_logps(model, batch), *reference_logps(model, batch), a.beta)
        out.losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % a.eval_every == 0 or step == a.max_steps:
            report(f"  (train loss {out.losses.mean().item():.3f}, L={batch['chosen_input_ids'].shape[1]})")


if __name__ == "__main__":
    main()
