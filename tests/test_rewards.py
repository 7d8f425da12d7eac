"""GRPO rewards: the built-ins on real-looking completions, weights, and one-sentence errors for bad user rewards."""

from __future__ import annotations

import math
import textwrap

import pytest

from shardtune import ShardtuneError
from shardtune.rewards import RewardSet, extract_answer, make_reward, normalize

ARITHMETIC = [
    {"prompt": "What is 17 + 25? Answer inside <answer></answer>.", "answer": "42"},
    {"prompt": "What is 120 * 10?", "answer": 1200},
    {"prompt": "What is 7 / 2?", "answer": "3.5"},
    {"prompt": "What is the capital of France?", "answer": "Paris"},
]
COMPLETIONS = [
    "17 + 25: 17 + 20 = 37, and 37 + 5 = 42.\n<answer>42</answer>",
    "120 times 10 is 1,200. So the answer is 1,200.",
    "Half of 7 is 3.50",
    "<answer> paris. </answer>",
]
WRONG = ["<answer>41</answer> (I first thought 42)", "1200 + 1 = 1201", "I don't know.", "<answer>Lyon</answer>"]
USER_MODULE = '''
import math

def length_ok(completions, records):
    return [1.0 if len(c) < 40 else 0.0 for c in completions]

def scaled(completions, records, scale=1.0):
    return [scale * len(str(r["answer"])) for r in records]

def raises(completions, records):
    return [float(r["score"]) for r in records]

def gives_nan(completions, records):
    return [0.5] * (len(completions) - 1) + [math.nan]

def too_few(completions, records):
    return [1.0] * (len(completions) - 1)

def gives_none(completions, records):
    return [None for _ in completions]

def gives_text(completions, records):
    return ["good" for _ in completions]

def gives_a_number(completions, records):
    return 1.0

NOT_A_FUNCTION = 3
'''


def one_sentence(error: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(error.value)
    assert "\n" not in msg and msg.endswith("."), msg
    assert ". " not in msg.rstrip(".").replace("e.g. ", ""), msg  # no second sentence
    for name in names:
        assert name in msg, (name, msg)
    return msg


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "broken_rewards.py").write_text("def f(completions, records):\n    return [1.0 for c in completions\n")
    (tmp_path / "failing_rewards.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_extract_answer_and_normalize():
    assert extract_answer(COMPLETIONS[0]) == "42"  # the answer tag wins over the numbers before it
    assert extract_answer("first <ANSWER>1</ANSWER> then <answer>2</answer> and 3") == "2"  # the last tag, any case
    assert extract_answer(COMPLETIONS[1]) == "1,200"  # else the last number
    assert extract_answer("no digits here") is None
    assert extract_answer("#### 72\nDone", pattern=r"####\s*(\S+)") == "72"  # GSM8K style, group 1
    assert extract_answer("x = -3.25 then", pattern=r"-?\d+\.\d+") == "-3.25"  # no group: the whole match
    assert normalize(" 1,200 ") == normalize("1200") == normalize(1200) == normalize("1200.0") == "1200"
    assert normalize("3.50") == "3.5" and normalize("$5.") == "5" and normalize("-0") == "0" and normalize("100") == "100"
    assert normalize("  Paris.  ") == normalize("PARIS") == "paris" and normalize("New   York") == "new york"
    assert normalize("1,2") == "1,2" and normalize("nan") == "nan"  # not a thousands separator; not a number


def test_exact_match_on_real_looking_completions():
    reward = make_reward("exact_match")
    assert reward.fn(COMPLETIONS, ARITHMETIC) == [1.0, 1.0, 1.0, 1.0]
    assert reward.fn(WRONG, ARITHMETIC) == [0.0, 0.0, 0.0, 0.0]
    gsm = make_reward("exact_match", pattern=r"####\s*(\S+)", answer_key="solution")
    assert gsm.fn(["5 + 3 = 8\n#### 8", "the answer is 8", "#### 9"], [{"solution": "8"}] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(ShardtuneError) as e:
        make_reward("exact_match", answer_key="solution").fn(COMPLETIONS[:1], ARITHMETIC[:1])
    one_sentence(e, "exact_match", "'solution'", "answer_key")


def test_format_reward():
    assert make_reward("format").fn(COMPLETIONS + WRONG, []) == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    strict = make_reward("format", pattern=r"<think>.+?</think>\s*<answer>.+?</answer>", fullmatch=True)
    got = strict.fn(["<think>17+25=42</think>\n<answer>42</answer>", "<think>x</think><answer>42</answer> extra",
                     "<answer>42</answer>"], [])
    assert got == [1.0, 0.0, 0.0]
    with pytest.raises(ShardtuneError) as e:
        make_reward("format", pattern="<answer>(.*")
    one_sentence(e, "format", "pattern")


class WordTokenizer:
    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return text.split()


def test_length_penalty_in_chars_and_tokens():
    chars = make_reward("length_penalty", target=10)
    assert chars.fn(["x" * 5, "x" * 10, "x" * 15, "x" * 40], []) == pytest.approx([0.0, 0.0, -0.5, -1.0])
    steep = make_reward("length_penalty", target=10, per_unit=0.01, max_penalty=0.05)
    assert steep.fn(["x" * 12, "x" * 100], []) == pytest.approx([-0.02, -0.05])
    tokens = make_reward("length_penalty", target=3, unit="tokens", per_unit=0.25, tokenizer=WordTokenizer())
    assert tokens.fn(["one two", "one two three four five", "a b c d e f g h"], []) == pytest.approx([0.0, -0.5, -1.0])
    with pytest.raises(ShardtuneError) as e:
        make_reward("length_penalty")
    one_sentence(e, "length_penalty", "target")
    with pytest.raises(ShardtuneError) as e:
        make_reward("length_penalty", target=5, unit="words")
    one_sentence(e, "length_penalty", "'words'")


def test_weights_combine_and_each_reward_is_kept(user_rewards):
    rewards = RewardSet([make_reward("exact_match", weight=1.0), make_reward("format", weight=0.5),
                         make_reward("length_penalty", weight=0.2, target=30),
                         make_reward(f"{user_rewards}:scaled", weight=-1.0, scale=0.1),
                         make_reward("format", weight=2.0, pattern=r"\d")])
    assert rewards.names == ["exact_match", "format", "length_penalty", "my_rewards:scaled", "format_2"]
    scores = rewards.scores(COMPLETIONS, ARITHMETIC)
    each = scores.each
    assert each["exact_match"] == [1.0] * 4 and each["format"] == [1.0, 0.0, 0.0, 1.0]
    assert each["my_rewards:scaled"] == pytest.approx([0.2, 0.4, 0.3, 0.5]) and each["format_2"] == [1.0, 1.0, 1.0, 0.0]
    for i in range(4):
        want = (each["exact_match"][i] + 0.5 * each["format"][i] + 0.2 * each["length_penalty"][i]
                - each["my_rewards:scaled"][i] + 2.0 * each["format_2"][i])
        assert scores.total[i] == pytest.approx(want)
    assert each["length_penalty"][0] < 0 and each["length_penalty"][2] == 0.0
    assert scores.means()["format"] == 0.5 and scores.means()["exact_match"] == 1.0


def test_a_user_reward_is_a_plain_function(user_rewards):
    reward = make_reward(f"{user_rewards}:length_ok", weight=0.5)
    scores = RewardSet([reward]).scores(COMPLETIONS, ARITHMETIC)
    assert scores.each == {"my_rewards:length_ok": [0.0, 0.0, 1.0, 1.0]} and scores.total == [0.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("name,says", [
    ("raises", "raised KeyError: 'score', at my_rewards.py line 11"),
    ("gives_nan", "returned nan for completion 3"),
    ("too_few", "returned 3 values for 4 completions"),
    ("gives_none", "returned None for completion 0"),
    ("gives_text", "returned 'good' for completion 0"),
    ("gives_a_number", "returned a float, not a list"),
])
def test_a_bad_user_reward_stops_with_one_sentence_naming_it(user_rewards, name, says):
    rewards = RewardSet([make_reward("format"), make_reward(f"{user_rewards}:{name}")])
    with pytest.raises(ShardtuneError) as e:
        rewards.scores(COMPLETIONS, ARITHMETIC)
    msg = one_sentence(e, f"reward function my_rewards:{name}", says)
    assert "return" in msg.split(";")[-1]  # the fix


@pytest.mark.parametrize("spec,says", [
    ("no_such_module_for_rewards:f", "ModuleNotFoundError: No module named 'no_such_module_for_rewards'); make module"),
    ("broken_rewards:f", "SyntaxError"),
    ("failing_rewards:f", "RuntimeError: needs a GPU, at failing_rewards.py line 1); fix module 'failing_rewards'"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:NOT_A_FUNCTION", "is not callable (its type is int)"),
    ("exact_mach", "did you mean exact_match"),
])
def test_an_unimportable_user_reward_is_one_sentence(user_rewards, spec, says):
    with pytest.raises(ShardtuneError) as e:
        make_reward(spec)
    one_sentence(e, spec, says)


def test_bad_options_and_weights_are_one_sentence():
    with pytest.raises(ShardtuneError) as e:
        make_reward("exact_match", answer_kye="solution")
    one_sentence(e, "exact_match", "'answer_kye'", "did you mean 'answer_key'")
    with pytest.raises(ShardtuneError) as e:
        make_reward("format", weight=math.inf)
    one_sentence(e, "format", "weight")
    with pytest.raises(ShardtuneError) as e:
        RewardSet([])
    one_sentence(e, "reward")
    assert make_reward("exact_match", pattern=None).fn(COMPLETIONS[:1], ARITHMETIC[:1]) == [1.0]  # unset: the default
