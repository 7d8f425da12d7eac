"""Rewards for online preference tuning (GRPO): built-in verifiable rewards, user rewards, a weighted sum.

A reward is a plain callable `f(completions: list[str], records: list[dict]) -> list[float]`: one float per
completion, in order; `records[i]` is the prompt's record (the JSONL row: the prompt and whatever the reward
needs, e.g. the reference answer) of completion i.

Built-ins (options are keyword arguments, e.g. from the config):
    exact_match     1.0 when the answer extracted from the completion equals the record's answer after
                    `normalize`, else 0.0. Extraction: the last match of `pattern` (its group 1 if it has
                    groups), or by default the text of the last <answer>...</answer>, else the last number.
    format          1.0 when `pattern` is found in the completion (re.search, DOTALL; `fullmatch: true`
                    for the whole completion), else 0.0.
    length_penalty  0.0 up to `target` chars (or tokens, with `unit: tokens`), then -per_unit for each unit
                    past it (default 1 / target), floored at -max_penalty (default 1.0).
A user reward is named "module:function" (importable where the job runs); options are passed to it as
keyword arguments.

`RewardSet` calls each reward on a rollout batch and returns the weighted sum per completion with each
reward's own values (logged per reward). A user reward that raises, returns the wrong number of values or
a value that is not a finite number stops the run with one ShardtuneError sentence naming it and the fix.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import os
import re
import traceback
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional

from shardtune import ShardtuneError

RewardFn = Callable[[list, list], list]
ANSWER_TAG = r"<answer>(.*?)</answer>"
LAST_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
STRIP = " \t\n.,;:!?'\"`*$"


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(error: BaseException) -> str:
    """", at file.py line N": where in the user's code an exception was raised (empty for a SyntaxError: its text says)."""
    skip = (__file__, os.path.dirname(importlib.__file__))  # this module and the import machinery are not the user's
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(("<", *skip))]
    if isinstance(error, SyntaxError) or not frames:
        return ""
    return f", at {os.path.basename(frames[-1].filename)} line {frames[-1].lineno}"


def _last_match(pattern: str, text: str, flags: int = re.DOTALL) -> Optional[str]:
    matches = list(re.finditer(pattern, text, flags))
    if not matches:
        return None
    m = matches[-1]
    return m.group(1) if m.re.groups else m.group(0)


def extract_answer(completion: str, pattern: Optional[str] = None) -> Optional[str]:
    """The answer in a completion: the last match of `pattern`, or the last <answer>...</answer>, else the last number."""
    if pattern is not None:
        return _last_match(pattern, completion)
    tagged = _last_match(ANSWER_TAG, completion, re.DOTALL | re.IGNORECASE)
    return tagged if tagged is not None else _last_match(LAST_NUMBER, completion)


def normalize(answer: object) -> str:
    """NFKC, casefold, single spaces, no surrounding punctuation; numbers in one canonical form ("1,000.0" -> "1000")."""
    text = " ".join(unicodedata.normalize("NFKC", str(answer)).casefold().split()).strip(STRIP)
    digits = text.replace(",", "") if THOUSANDS.fullmatch(text) else text
    try:
        number = Decimal(digits)
    except InvalidOperation:
        return text
    if not number.is_finite():
        return text
    return format(number.normalize(), "f") if number != 0 else "0"


def exact_match(completions: list, records: list, *, answer_key: str = "answer", pattern: Optional[str] = None) -> list:
    """1.0 where the extracted answer equals record[answer_key] after `normalize`, else 0.0."""
    out = []
    for i, (completion, record) in enumerate(zip(completions, records)):
        if answer_key not in record:
            raise ShardtuneError(f"reward exact_match reads each record's {answer_key!r} field but record {i} has "
                                 f"only {sorted(record)}; add the field to the prompts' data or set the reward's answer_key.")
        got = extract_answer(completion, pattern)
        out.append(float(got is not None and normalize(got) == normalize(record[answer_key])))
    return out


def format_match(completions: list, records: list, *, pattern: str = ANSWER_TAG, fullmatch: bool = False) -> list:
    """1.0 where the completion matches `pattern` (found anywhere, or the whole completion with fullmatch), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    find = regex.fullmatch if fullmatch else regex.search
    return [float(find(c) is not None) for c in completions]


def length_penalty(completions: list, records: list, *, target: int, unit: str = "chars",
                   per_unit: Optional[float] = None, max_penalty: float = 1.0,
                   count: Optional[Callable[[str], int]] = None) -> list:
    """0.0 up to `target` units, then -per_unit for each unit past it, floored at -max_penalty."""
    per_unit = 1.0 / max(target, 1) if per_unit is None else per_unit
    size = count if unit == "tokens" else len
    return [-min(max_penalty, max(0, size(c) - target) * per_unit) for c in completions]


BUILTINS: dict[str, Callable] = {"exact_match": exact_match, "format": format_match, "length_penalty": length_penalty}


def load_user_reward(spec: str) -> Callable:
    """Import "module:function" (the attribute may be dotted, e.g. "module:Class.method")."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        near = difflib.get_close_matches(spec, list(BUILTINS), n=1)
        hint = f" (did you mean {near[0]})" if near else ""
        raise ShardtuneError(f"reward {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor 'module:function'; "
                             f"name a built-in{hint} or an importable Python function as module:function.")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the module is missing, or it raised while it was imported
        missing = isinstance(e, ModuleNotFoundError) and module_name.startswith(e.name or "\0")
        fix = (f"make module {module_name!r} importable (installed or on PYTHONPATH) wherever the job runs" if missing
               else f"fix module {module_name!r} so that it imports")
        raise ShardtuneError(f"reward {spec!r} cannot be imported ({type(e).__name__}: {_one_line(e)}{_where(e)}); "
                             f"{fix}.") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ShardtuneError(f"reward {spec!r} names {attr!r} but module {module_name!r} has no attribute "
                                 f"{part!r}; put the function's name after the colon.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ShardtuneError(f"reward {spec!r} is not callable (its type is {type(obj).__name__}); name a function "
                             "f(completions, records) -> list of floats.")
    return obj


def _checked_options(name: str, options: dict, tokenizer: object) -> dict:
    """A built-in's options, checked (one sentence naming the reward on a bad one); None means the default."""
    fn = BUILTINS[name]
    options = {k: v for k, v in options.items() if v is not None}  # an unset option in the config: the default
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY and p.name != "count"]
    for key in options:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]!r})" if near else ""
            raise ShardtuneError(f"reward {name} has no option {key!r}; use one of {', '.join(allowed)}{hint}.")
    if "pattern" in options:
        try:
            re.compile(options["pattern"])
        except re.error as e:
            raise ShardtuneError(f"reward {name}'s pattern {options['pattern']!r} is not a valid regular expression "
                                 f"({_one_line(e)}); fix the pattern (Python `re` syntax).") from e
    return _length_options(options, tokenizer) if name == "length_penalty" else options


def _length_options(options: dict, tokenizer: object) -> dict:
    target = options.get("target")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ShardtuneError("reward length_penalty needs `target`, the length (an integer >= 0) past which it "
                             "penalises; set it in the reward's options.")
    unit = options.get("unit", "chars")
    if unit not in ("chars", "tokens"):
        raise ShardtuneError(f"reward length_penalty's unit {unit!r} is not chars or tokens; set one of them.")
    if unit == "tokens":
        if tokenizer is None:
            raise ValueError("length_penalty in tokens needs the tokenizer")
        options = {**options, "count": lambda text: len(tokenizer.encode(text, add_special_tokens=False))}
    return options


@dataclass(frozen=True)
class Reward:
    name: str  # the built-in's name or the "module:function" spec: names the reward in logs and errors
    fn: RewardFn
    weight: float = 1.0


def make_reward(name: str, weight: float = 1.0, tokenizer: object = None, **options) -> Reward:
    """A built-in by name or a user reward as "module:function", with its options and weight.

    `tokenizer` (anything with `encode(text, add_special_tokens=False)`) counts tokens for length_penalty.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ShardtuneError(f"reward {name}'s weight {weight!r} is not a finite number; set a number such as 1.0.")
    if name in BUILTINS:
        fn, options = BUILTINS[name], _checked_options(name, options, tokenizer)
    else:
        fn = load_user_reward(name)
    return Reward(name, functools.partial(fn, **options) if options else fn, float(weight))


@dataclass
class RewardScores:
    total: list  # [N] the weighted sum per completion
    each: dict  # reward name -> [N] its own (unweighted) values

    def means(self) -> dict:
        return {name: sum(v) / max(len(v), 1) for name, v in self.each.items()}


def _checked(reward: Reward, completions: list, records: list) -> list:
    """Call one reward and check what it returns; ShardtuneError (one sentence naming it) on anything wrong."""
    who = f"reward function {reward.name}"
    try:
        values = reward.fn(completions, records)
    except ShardtuneError:
        raise
    except Exception as e:
        raise ShardtuneError(f"{who} raised {type(e).__name__}: {_one_line(e)}{_where(e)}; fix it so that it returns a float "
                             "for every completion (e.g. 0.0 for one it cannot score).") from e
    try:
        values = list(values)
    except TypeError:
        raise ShardtuneError(f"{who} returned a {type(values).__name__}, not a list; return a list with one float "
                             "per completion, in the order given.") from None
    if len(values) != len(completions):
        raise ShardtuneError(f"{who} returned {len(values)} values for {len(completions)} completions; return "
                             "exactly one float per completion, in the order given.")
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = None
        if x is None or not math.isfinite(x):
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
            raise ShardtuneError(f"{who} returned {shown} for completion {i}; return a finite float for every "
                                 "completion (e.g. 0.0 for one it cannot score).")
        out.append(x)
    return out


class RewardSet:
    """Several rewards with weights: `scores(completions, records)` -> RewardScores."""

    def __init__(self, rewards: list):
        if not rewards:
            raise ShardtuneError("GRPO needs at least one reward; list one under the task's rewards (e.g. exact_match).")
        self.rewards, self.names = list(rewards), []
        for r in self.rewards:  # the same reward twice (say two format patterns): format, format_2
            name, k = r.name, 2
            while name in self.names:
                name, k = f"{r.name}_{k}", k + 1
            self.names.append(name)

    def scores(self, completions: list, records: list) -> RewardScores:
        if len(records) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(records)} records")
        each = {n: _checked(r, completions, records) for n, r in zip(self.names, self.rewards)}
        total = [sum(r.weight * each[n][i] for n, r in zip(self.names, self.rewards)) for i in range(len(completions))]
        return RewardScores(total, each)

    __call__ = scores
