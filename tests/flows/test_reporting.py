"""The words users read in the Prefect and MLflow UIs (the served end-to-end run is
tests/flows/test_service.py)."""

from __future__ import annotations

from flows.reporting import artifact_key, catalogue_report, fmt
from store_core.catalogue import CatalogueOutcome
from store_core.stages import StageOutcome


def test_numbers_are_rounded_and_keys_scoped_to_the_experiment() -> None:
    assert fmt(0.09593507138471924) == "0.0959"
    assert fmt(48) == "48"
    assert fmt(None) == "n/a"
    assert artifact_key("store-ml-100k", "run-summary") == "store-ml-100k-run-summary"
    assert artifact_key("My Experiment_2", "stage-evaluate") == "my-experiment-2-stage-evaluate"


def test_unchanged_catalogue_names_the_current_version() -> None:
    counts = {"new": 0, "changed": 0, "restored": 0, "unchanged": 50, "removed": 0}
    outcome = StageOutcome("run-1", CatalogueOutcome(None, counts, 1200.0, 0.04))
    report = catalogue_report(
        outcome, "keep", previous_version=2, current_version=2, model="models:/m@production"
    )
    assert report.line == (
        "tokenize-catalogue: catalogue unchanged, current semantic-ID version 2 "
        "(0 new, 0 changed, 0 restored, 0 removed, 50 unchanged against version 2); "
        "model models:/m@production"
    )
    assert report.markdown.startswith("**Catalogue unchanged, current semantic-ID version 2**")
    assert "None" not in report.markdown
    assert report.headline["semantic_id_version"] == 2.0
    assert report.summary.written is False and report.summary.current_version == 2
    assert report.summary.run_id == "run-1" and report.summary.line == report.line


def test_first_version_says_what_it_was_counted_against() -> None:
    counts = {"new": 0, "unchanged": 48}
    outcome = StageOutcome("run-1", CatalogueOutcome(1, counts, 900.0, 0.05))
    report = catalogue_report(outcome, "keep", previous_version=None, current_version=1, model=None)
    assert report.line == (
        "tokenize-catalogue: semantic-ID version 1 written (0 new, 0 changed, 0 restored, "
        "0 removed, 48 unchanged against the IDs the tokenizer training assigned)"
    )
    assert report.headline["items_unchanged"] == 48.0


def test_regenerate_says_how_many_ids_were_generated_and_changed() -> None:
    counts = {"unchanged": 48, "generated": 48, "reassigned": 46}
    outcome = StageOutcome("run-1", CatalogueOutcome(1, counts, 900.0, 0.05))
    report = catalogue_report(
        outcome, "regenerate", previous_version=None, current_version=1, model=None
    )
    assert report.line == (
        "tokenize-catalogue: semantic-ID version 1 written (0 new, 0 changed, 0 restored, "
        "0 removed, 48 unchanged against the IDs the tokenizer training assigned; "
        "regenerated 48 IDs, 46 of them changed)"
    )
