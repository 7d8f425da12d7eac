"""Length-grouped batch order: a seeded permutation per epoch that pads far less than a random order."""

from __future__ import annotations

import csv

import pytest
import torch

from shardtune.data.grouping import length_grouped_order, padded_tokens


def _lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 65, (n,), generator=g).tolist()


@pytest.mark.parametrize("n, batch, mega", [(1000, 32, 50), (1000, 32, 3), (97, 8, 2), (5, 8, 50), (0, 4, 2), (64, 64, 1)])
def test_each_epoch_is_a_permutation_of_all_examples(n, batch, mega):
    lengths = _lengths(n)
    for epoch in range(3):
        order = length_grouped_order(lengths, batch, seed=7, epoch=epoch, mega=mega)
        assert sorted(order) == list(range(n))


def test_deterministic_in_seed_and_epoch_and_different_across_them():
    lengths = _lengths(1000)
    a = length_grouped_order(lengths, 32, seed=7, epoch=0)
    assert a == length_grouped_order(list(lengths), 32, seed=7, epoch=0)
    assert a != length_grouped_order(lengths, 32, seed=7, epoch=1)
    assert a != length_grouped_order(lengths, 32, seed=8, epoch=0)
    assert length_grouped_order(lengths, 32, seed=-1, epoch=0) == length_grouped_order(lengths, 32, seed=-1, epoch=0)


def test_batches_are_length_sorted_runs_and_a_short_last_batch_stays_last():
    lengths = _lengths(1000)  # 31 full batches of 32 and one of 8
    order = length_grouped_order(lengths, 32, seed=7, epoch=0, mega=4)
    batches = [order[i : i + 32] for i in range(0, 1000, 32)]
    assert [len(b) for b in batches] == [32] * 31 + [8]
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # the batch order is shuffled: the longest batches are not all at the front of their mega-batches
    firsts = [lengths[b[0]] for b in batches[:-1]]
    assert firsts[1:] != sorted(firsts[1:], reverse=True)


@pytest.mark.parametrize("epoch", range(4))
def test_the_longest_full_batch_comes_first_in_every_epoch(epoch):
    # so that a batch too large for memory fails at the first step of an epoch (the Trainer's sampler does this)
    lengths = _lengths(1000, seed=epoch)
    lengths[999] = 200  # the longest example; the first full batch must hold it
    order = length_grouped_order(lengths, 32, seed=7, epoch=epoch, mega=4)
    widths = [max(lengths[i] for i in order[k : k + 32]) for k in range(0, 992, 32)]
    assert widths[0] == 200 == max(widths)
    assert 999 in order[:32]


def test_padded_tokens_counts_rounding_to_a_multiple_of_8():
    assert padded_tokens([3, 5, 9], [0, 1, 2], batch=3) == 3 * 16 - 17
    assert padded_tokens([3, 5, 9], [0, 1, 2], batch=2) == (8 * 2 - 8) + (16 - 9)


def test_pads_far_less_than_a_random_order_on_the_real_rotten_tomatoes_lengths():
    from transformers import AutoTokenizer

    from shardtune.assets import packaged_data, packaged_model

    with open(packaged_data("rotten-tomatoes"), encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=64)["input_ids"]]
    random = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(42)).tolist()  # the task's order today
    grouped = length_grouped_order(lengths, 32, seed=42, epoch=0)
    pad_random, pad_grouped = padded_tokens(lengths, random, 32), padded_tokens(lengths, grouped, 32)
    assert pad_grouped < pad_random / 4, (pad_grouped, pad_random)


def test_a_checkpoint_position_names_its_batch_order_and_another_order_is_reported_on_load():
    """`samples` counts into one epoch's order: a position saved in another order (before the longest batch went
    first, or with group_by_length switched) resumes into a different rest of the epoch, which must be said."""
    import warnings

    from shardtune.data.grouping import GROUPED_ORDER
    from shardtune.tasks import EpochPosition

    class Task(EpochPosition):
        data_name = "classification"

        def __init__(self, order):
            self.order, self._position = order, {"epoch": 0, "samples": 0}

    grouped, random = Task(GROUPED_ORDER), Task(None)
    saved = grouped.state_dict({"epoch": 1, "samples": 64})
    assert saved == {"epoch": 1, "samples": 64, "order": GROUPED_ORDER}
    assert random.state_dict({"epoch": 1, "samples": 64}) == {"epoch": 1, "samples": 64}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped.load_state_dict([saved, saved])  # the same order: silent
        random.load_state_dict([{"epoch": 1, "samples": 64}])
        grouped.load_state_dict([{"epoch": 2, "samples": 0}])  # at an epoch's start every order is whole
    assert grouped.position() == {"epoch": 2, "samples": 0}
    with pytest.warns(UserWarning, match="64 examples into epoch 1 of batch order random .* some of its examples repeat"):
        grouped.load_state_dict([{"epoch": 1, "samples": 64}])  # an older checkpoint: no order recorded
    assert grouped.position() == {"epoch": 1, "samples": 64}
    with pytest.warns(UserWarning, match="and this run's order is random"):
        random.load_state_dict([saved])
