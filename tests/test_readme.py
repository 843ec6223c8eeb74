"""The README's table of contents lists every top-level section, in order, with the anchor GitHub gives it."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _headings(text: str, level: int) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#" * level + " "):
            out.append(line[level + 1 :].strip())
    return out


def test_anchor_by_hand():
    assert _anchor("Experiments: the papers' findings at small scale") == "experiments-the-papers-findings-at-small-scale"
    assert _anchor("Measured results (2-core x86_64 CPU, one seed, short runs)") == (
        "measured-results-2-core-x86_64-cpu-one-seed-short-runs")


def test_toc_lists_every_section_in_order():
    text = open(README, encoding="utf-8").read()
    toc = text[text.index("<!-- toc -->") : text.index("<!-- /toc -->")]
    top = re.findall(r"^- \[(.+)\]\(#(.+)\)$", toc, re.M)
    sections = [h for h in _headings(text, 2) if h != "Contents"]
    assert [t for t, _ in top] == sections
    assert all(anchor == _anchor(title) for title, anchor in top), top
    nested = re.findall(r"^  - \[(.+)\]\(#(.+)\)$", toc, re.M)
    subsections = set(_headings(text, 3))
    for title, anchor in nested:
        assert title in subsections and anchor == _anchor(title), title
