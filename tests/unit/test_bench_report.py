"""BENCHMARKS.md is generated from bench/results, and every figure in it traces to a results file."""

from __future__ import annotations

import json

import pytest

from bench import report


def test_benchmarks_md_is_the_rendering_of_the_results_files():
    assert report.OUT.read_text() == report.render(), "BENCHMARKS.md is stale: run `python -m bench.report`"


def test_every_row_reads_a_value_from_its_results_file():
    for path in sorted(report.RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        _, rows = report.SECTIONS.get(path.stem, ("", report._headline))
        rows = list(rows(doc))
        assert rows, f"{path.name}: no figures reach BENCHMARKS.md"
        for _, where in rows:
            report.lookup(doc, where)


def test_lookup_names_the_missing_part():
    doc = {"runs": [{"auc": 0.7}]}
    assert report.lookup(doc, ("runs", 0, "auc")) == 0.7
    with pytest.raises(KeyError, match=r"runs\[0\]\.cold_auc: no 'cold_auc'"):
        report.lookup(doc, ("runs", 0, "cold_auc"))


def test_numbers_are_formatted_for_reading():
    assert report.fmt(567820.4) == "567,820"
    assert report.fmt(285.238) == "285.2"
    assert report.fmt(0.90675) == "0.907"
    assert report.fmt(float("nan")) == "n/a"
    assert report.fmt(True) == "true"


def test_the_readme_table_is_the_rendering_of_the_results_files():
    text = report.README.read_text()
    assert report.readme_with_block(text) == text, "README's bench table is stale: run `python -m bench.report`"
    assert "| figure | value | source |" in text
