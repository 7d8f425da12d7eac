"""Build data/pydocs-faq-sft.jsonl: real question/answer pairs from the Python 3.11 FAQ.

Source: Debian python3.11-doc, /usr/share/doc/python3.11/html/_sources/faq/*.rst.txt
(the Python documentation, PSF license). Every FAQ section whose heading is a
question ("How do I ...?") becomes one record:
    {"prompt": <the heading>, "response": <the first paragraph of its answer>}
with light RST cleanup (roles like :func:`x` -> x, ``code`` -> code). Records
whose answer's first paragraph is a code block or shorter than 20 characters
are skipped; answers are cut at 600 characters on a sentence end when longer.
Run: python data/make_pydocs_faq_sft.py  (deterministic; no network).
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

SRC = "/usr/share/doc/python3.11/html/_sources/faq"
OUT = Path(__file__).with_name("pydocs-faq-sft.jsonl")
UNDERLINE = re.compile(r"^([=\-~^\"'*+#])\1{2,}\s*$")


def clean(text: str) -> str:
    text = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_*", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def first_paragraph(lines: list[str], i: int) -> str:
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("..") or lines[i].startswith("   ")):
        i += 1
    para = []
    while i < len(lines) and lines[i].strip() and not UNDERLINE.match(lines[i]):
        para.append(lines[i])
        i += 1
    if i < len(lines) and UNDERLINE.match(lines[i]):
        return ""  # ran into the next heading
    return clean(" ".join(para))


def shorten(text: str, limit: int = 600) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 100 else text[:limit]


def faq_records() -> list[dict]:
    """{"prompt": question, "response": answer} of every usable FAQ question, in file order (also used by make_pydocs_dpo.py)."""
    records = []
    for path in sorted(glob.glob(f"{SRC}/*.rst.txt")):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        for i in range(len(lines) - 1):
            head = lines[i].strip()
            if head.endswith("?") and UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].strip()) >= len(head) - 2:
                answer = first_paragraph(lines, i + 2)
                if len(answer) >= 20 and not answer.endswith("::"):
                    records.append({"prompt": clean(head), "response": shorten(answer)})
    return records


def main() -> None:
    records = faq_records()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} records, {OUT.stat().st_size} bytes -> {OUT}")


if __name__ == "__main__":
    main()
