from __future__ import annotations

from store_core.textrender import clean, content_hash, render_text, template_fields


def test_default_rendering_lists_non_empty_fields_in_order() -> None:
    fields = {"title": "Toy Story (1995)", "release_date": "", "genres": "Comedy"}
    assert render_text(fields, None, 100) == "title: Toy Story (1995); genres: Comedy"


def test_template_rendering_blanks_missing_fields_and_cleans() -> None:
    fields = {"title": "Beaker", "description": "<p>Glass   beaker</p>"}
    text = render_text(fields, "{title}. {description} Brand: {brand}", 100)
    assert text == "Beaker. Glass beaker Brand:"
    assert template_fields("{title}. {brand}") == ["title", "brand"]


def test_truncation() -> None:
    assert render_text({"title": "x" * 50}, "{title}", 10) == "x" * 10


def test_clean_strips_tags() -> None:
    assert clean(" a <br/> b\n\tc ") == "a b c"


def test_content_hash_changes_with_content_only() -> None:
    a = content_hash({"title": "A"}, "A")
    assert a == content_hash({"title": "A"}, "A")
    assert a != content_hash({"title": "B"}, "B")
    assert a != content_hash({"title": "A"}, "A!")
    assert len(a) == 64
