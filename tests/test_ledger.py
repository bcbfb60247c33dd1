"""The claims ledger: thirteen claims in order, each pointing at a real section and real references,
each with a verdict (the computed ones from the committed cache)."""

from __future__ import annotations

import re
from pathlib import Path

from icl import ledger
from icl.book import setup

REPO = Path(__file__).resolve().parents[1]


def test_claims_are_c1_to_c13_in_order():
    assert [c.id for c in ledger.CLAIMS] == [f"C{i}" for i in range(1, 14)]


def test_every_claim_points_at_a_section_and_cited_sources_that_exist():
    sources = "\n".join(p.read_text() for p in (REPO / "report").glob("*.qmd"))
    keys = set(re.findall(r"^@\w+\{([^,]+),", (REPO / "references.bib").read_text(), re.M))
    for c in ledger.CLAIMS:
        assert "{#" + c.section + "}" in sources, c.section
        cited = re.findall(r"@([\w-]+)", c.source)
        assert cited and set(cited) <= keys, (c.id, cited)


def test_every_claim_has_a_verdict_and_the_computed_ones_come_from_the_cache():
    v = ledger.verdicts(setup())
    assert set(v) == {c.id for c in ledger.CLAIMS} and all(isinstance(x, str) and x for x in v.values())
    computed = [c.id for c in ledger.CLAIMS if c.verdict is None]
    assert computed == ["C6", "C10", "C11", "C12", "C13"]
