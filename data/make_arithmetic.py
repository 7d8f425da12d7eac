"""Build data/arithmetic/{train,validation}.jsonl: small verifiable arithmetic prompts for GRPO (#24).

Each record is one question with its reference answer:
    {"prompt": "What is 17 + 25? Answer with the number inside <answer></answer>.", "answer": "42"}
A reward checks a completion against "answer" (exact match of the text between
<answer> and </answer>, or of the last number; a format reward for the tags).

The prompt is the user turn only. The packaged model, SmolLM2-135M-Instruct,
is a chat model: the GRPO task renders a record as
    tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
(the template adds its default system turn, "You are a helpful AI assistant
named SmolLM, ..."), exactly as the SFT task renders a prompt_response record
without its response. --messages also writes the chat form
("messages": [{"role": "user", ...}]) into every record, for readers that
want it; the default leaves it out to keep the files small.

Difficulty knobs: the operations (--ops, from + - *), the operand range
(--min/--max; * draws both factors from --mul-min/--mul-max instead), the
number of operands (--terms; evaluated left to right, shown without
parentheses only for + and -, so a mixed 3-term expression with * follows the
usual precedence: the answer is Python's eval of the shown expression) and
whether a subtraction may go negative (--negatives). --phrasing picks the
question template (PHRASINGS). The defaults are the setting chosen for
configs/smollm2-grpo-arithmetic.yaml: + and - of 1..20, phrasing
answer_example. That range holds only 420 distinct expressions (210 sums,
210 differences), hence 320 train / 100 validation; a 15-minute CPU run reads
about 100 train prompts.

Starting accuracy of the packaged SmolLM2-135M-Instruct (Q4_1 GGUF,
dequantized) on 100 held-out prompts, greedy, 32 new tokens, answer = the
<answer> text else the last number (the exact_match reward); it never wrote
the tags (format 0.00) under any phrasing tried, and it writes "a + b = c":
    --ops +  --min 1  --max 20 --phrasing answer_example      0.33
    --ops +- --min 1  --max 20 --phrasing answer_example      0.29  (default)
    --ops +- --min 10 --max 99 --phrasing answer_example      0.15
    --ops +- --min 10 --max 99 --phrasing answer_tags         0.13
    --ops +-* --terms 3 --min 1 --max 20 --phrasing answer_tags  0.02
A GRPO pilot on the default (LoRA r8 on all linear layers, lr 1e-3, 2
prompts x 8 completions, temperature 0.7, 16 new tokens, beta 0) raised it
from 0.29 to 0.49 in 23 steps (550 s on a loaded 2-core CPU, one thread).

Train and validation share no expression (an expression and its commuted
twin, 17 + 25 and 25 + 17, count as one), so held-out accuracy measures
unseen questions. Deterministic: every random choice comes from
random.Random(--seed).
Run: python data/make_arithmetic.py [--train 320 --validation 100 --out data/arithmetic]  (no network).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("arithmetic")
SEED = 0
PHRASINGS = {
    "answer_tags": "What is {expr}? Answer with the number inside <answer></answer>.",
    "answer_example": "What is {expr}? Reply with only the number inside answer tags, like <answer>7</answer>.",
    "compute": "Compute {expr}. Give the final answer as <answer>number</answer>.",
}
DEFAULTS = {"ops": "+-", "min": 1, "max": 20, "mul_min": 2, "mul_max": 12, "terms": 2, "negatives": False, "phrasing": "answer_example"}


def draw_expression(rng: random.Random, args: argparse.Namespace) -> tuple[str, int, tuple]:
    """-> (shown expression, its value, a key shared by commuted twins)."""
    ops = [rng.choice(args.ops) for _ in range(args.terms - 1)]
    terms = []
    for i in range(args.terms):
        beside_mul = (i > 0 and ops[i - 1] == "*") or (i < len(ops) and ops[i] == "*")
        lo, hi = (args.mul_min, args.mul_max) if beside_mul else (args.min, args.max)
        terms.append(rng.randint(lo, hi))
    if args.terms == 2 and ops[0] == "-" and not args.negatives and terms[0] < terms[1]:
        terms.reverse()  # a - b with a >= b: the answer stays a natural number
    expr = str(terms[0]) + "".join(f" {op} {t}" for op, t in zip(ops, terms[1:]))
    value = eval(expr)  # noqa: S307  only digits and + - * built above
    if args.terms > 2 and not args.negatives and value < 0:
        return draw_expression(rng, args)
    key = (tuple(sorted(terms)), ops[0]) if args.terms == 2 and ops[0] in "+*" else (tuple(terms), tuple(ops))
    return expr, value, key


def build(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(train, validation) records with no expression in both."""
    rng = random.Random(args.seed)
    template = PHRASINGS[args.phrasing]
    want = args.train + args.validation
    seen: set = set()
    records: list[dict] = []
    for _ in range(want * 50):
        if len(records) == want:
            break
        expr, value, key = draw_expression(rng, args)
        if key in seen:
            continue
        seen.add(key)
        prompt = template.format(expr=expr)
        rec = {"prompt": prompt, "answer": str(value)}
        if args.messages:
            rec["messages"] = [{"role": "user", "content": prompt}]
        records.append(rec)
    if len(records) < want:
        raise SystemExit(f"only {len(records)} distinct expressions in this range; widen --min/--max or ask for fewer records.")
    return records[args.validation :], records[: args.validation]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="folder for train.jsonl and validation.jsonl")
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--validation", type=int, default=100)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--ops", default=DEFAULTS["ops"], help="operations to draw from, e.g. '+-*'")
    ap.add_argument("--min", type=int, default=DEFAULTS["min"], help="smallest operand of + and -")
    ap.add_argument("--max", type=int, default=DEFAULTS["max"], help="largest operand of + and -")
    ap.add_argument("--mul-min", type=int, default=DEFAULTS["mul_min"], help="smallest factor of *")
    ap.add_argument("--mul-max", type=int, default=DEFAULTS["mul_max"], help="largest factor of *")
    ap.add_argument("--terms", type=int, default=DEFAULTS["terms"], help="operands per expression (>= 2)")
    ap.add_argument("--negatives", action="store_true", help="allow negative answers")
    ap.add_argument("--phrasing", choices=sorted(PHRASINGS), default=DEFAULTS["phrasing"])
    ap.add_argument("--messages", action="store_true", help="also store the chat form of each prompt")
    args = ap.parse_args(argv)
    if args.terms < 2 or not args.ops or set(args.ops) - set("+-*"):
        ap.error("--terms must be >= 2 and --ops a non-empty mix of + - *")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train, validation = build(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("validation", validation)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        print(f"{len(recs)} {name} prompts, {path.stat().st_size} bytes -> {path}")


if __name__ == "__main__":
    main()
