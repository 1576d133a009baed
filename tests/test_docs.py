"""Everything the code cites lives in the repository, under docs/.

1. No file of the repository points at design notes outside it (the sibling `shared` folder,
   its design and pitfalls files): a user who clones the repository could not read them.
2. Every `docs/<file>.md` or `docs/<file>.md#<anchor>` cited in the code exists, and the anchor
   is a heading of that file (GitHub's slug of it); so are the relative links between the pages
   of docs/ itself.
3. docs/ops.md has a section for each op in `engine.ops.__all__`.
"""
from __future__ import annotations

import os
import re

import pytest

import engine.ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SCANNED_DIRS = ("engine", "csrc", "triton_kernels", "pebr", "bench", "tests", "docs")
SCANNED_FILES = ("README.md", "setup.py", "CMakeLists.txt")
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".benchmarks", "build"}
THIS_FILE = os.path.relpath(os.path.abspath(__file__), ROOT)

# Built from parts so that this file does not contain what it looks for.
FORBIDDEN = ("../" + "shared", "DESIGN" + ".md", "PIT" + "FALLS")
CITATION = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
LINK = re.compile(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)")  # [text](page.md#anchor) inside docs/
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _text_files() -> list[str]:
    """Repository-relative paths of the scanned text files (binary files, e.g. a built .so, skipped)."""
    paths = [name for name in SCANNED_FILES if os.path.isfile(os.path.join(ROOT, name))]
    for top in SCANNED_DIRS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            for name in sorted(files):
                paths.append(os.path.relpath(os.path.join(folder, name), ROOT))
    out = []
    for rel in paths:
        with open(os.path.join(ROOT, rel), "rb") as f:
            data = f.read()
        if b"\0" not in data:
            out.append(rel)
    return out


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
        return f.read()


def github_slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: inline markup dropped, lower case, punctuation
    other than `-` and `_` removed, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: str) -> set[str]:
    """Slugs of every heading of docs/<page> outside code fences (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in _read(os.path.join("docs", page)).splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _citations() -> list[tuple[str, str, str | None]]:
    """(citing file, cited page, anchor or None) for every docs/ citation, and every relative link in docs/."""
    found = []
    for rel in _text_files():
        if rel == THIS_FILE:
            continue
        text = _read(rel)
        for m in CITATION.finditer(text):
            found.append((rel, m.group(1), m.group(2)))
        if rel.startswith("docs" + os.sep) and rel.endswith(".md"):
            for m in LINK.finditer(text):
                found.append((rel, m.group(1), m.group(2)))
    return found


def test_no_file_cites_notes_outside_the_repository():
    offenders = []
    for rel in _text_files():
        if rel == THIS_FILE:
            continue
        for lineno, line in enumerate(_read(rel).splitlines(), start=1):
            hits = [s for s in FORBIDDEN if s in line]
            if hits:
                offenders.append(f"{rel}:{lineno}: {', '.join(hits)}")
    assert not offenders, "cite docs/ instead of notes outside the repository:\n" + "\n".join(offenders)


def test_cited_docs_and_anchors_exist():
    missing = []
    cache: dict[str, set[str]] = {}
    for rel, page, anchor in _citations():
        if not os.path.isfile(os.path.join(DOCS, page)):
            missing.append(f"{rel}: docs/{page} does not exist")
            continue
        if anchor is not None:
            if page not in cache:
                cache[page] = anchors(page)
            if anchor not in cache[page]:
                missing.append(f"{rel}: docs/{page}#{anchor}: no such heading (headings: {sorted(cache[page])})")
    assert not missing, "\n".join(sorted(set(missing)))


@pytest.mark.parametrize("op", sorted(engine.ops.__all__))
def test_ops_md_has_a_section_per_op(op):
    assert op in anchors("ops.md"), f"docs/ops.md has no section `## {op}` for engine.ops.{op}"


def test_github_slug():
    assert github_slug("token_logprobs") == "token_logprobs"
    assert github_slug("Triton and its CPU interpreter") == "triton-and-its-cpu-interpreter"
    assert github_slug("transformers and a tiny Qwen2.5-VL") == "transformers-and-a-tiny-qwen25-vl"
    assert github_slug("`grpo_loss`: the *loss*") == "grpo_loss-the-loss"
