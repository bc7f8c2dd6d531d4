"""docs/benchmarks.md cites results with the hash of the engine they ran on; stale ones are flagged.

Every benchmark report starts with ``- core/ sources sha256: <hash>`` (``bench.common.core_hash``).
This test fails when a report section of docs/benchmarks.md lacks that line (its age could not be
told), and warns, naming the sections, when a cited hash is not today's ``core/``: the figures there
were measured on an older engine and should be re-run before they are quoted.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from bench.common import core_hash

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
REPORT = re.compile(r"^- command: `python [^`]*bench/\S+\.py", re.MULTILINE)
HASH = re.compile(r"^- core/ sources sha256: ([0-9a-f]{12})$", re.MULTILINE)


def cited_reports(text: str) -> list[tuple[str, str | None]]:
    """(command line, hash or None) of every report pasted into ``text``."""
    starts = [match.start() for match in REPORT.finditer(text)] + [len(text)]
    reports = []
    for start, end in zip(starts, starts[1:]):
        section = text[start:end]
        found = HASH.search(section)
        reports.append((section.splitlines()[0], found.group(1) if found else None))
    return reports


def test_every_cited_report_names_its_engine_and_stale_ones_are_flagged():
    reports = cited_reports(BENCHMARKS.read_text())
    assert reports, "docs/benchmarks.md cites no benchmark report"
    assert all(digest is not None for _, digest in reports), [line for line, d in reports if d is None]
    current = core_hash()
    stale = [f"{line} (core {digest})" for line, digest in reports if digest != current]
    if stale:
        warnings.warn(f"{len(stale)} of {len(reports)} reports in docs/benchmarks.md ran on another core/ than "
                      f"today's ({current}); re-run before quoting them: " + "; ".join(stale), stacklevel=1)


def test_the_parser_finds_reports_and_their_hashes():
    text = ("## A\n- command: `python bench/a.py --out x` (cwd /r)\n- core/ sources sha256: 0123456789ab\n\n"
            "## B\n- command: `python bench/b.py`\n- date: today\n")
    assert cited_reports(text) == [("- command: `python bench/a.py --out x` (cwd /r)", "0123456789ab"),
                                   ("- command: `python bench/b.py`", None)]
