"""`make mutations` (tests/mutations.py) stops at a snippet that no longer occurs exactly once: checked here on every
`make test`, so a refactor that moves a mutated line is caught in the suite, not at the next mutation run."""

from __future__ import annotations

import pytest

import mutations
from conftest import ROOT


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_snippet_occurs_once(mutation):
    text = (ROOT / "src" / "shardtune" / mutation.file).read_text()
    assert text.count(mutation.old) == 1, (mutation.name, mutation.file)
    assert mutation.new != mutation.old
