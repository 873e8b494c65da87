"""Rendering an item's text fields into the one string the LLM reads, and hashing it."""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping

_WHITESPACE = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]{1,200}>")


def clean(value: str) -> str:
    """Strip HTML-ish tags and collapse whitespace (Amazon descriptions carry markup)."""
    return _WHITESPACE.sub(" ", _TAG.sub(" ", value)).strip()


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def template_fields(template: str) -> list[str]:
    """The field names a format template refers to (for validating it up front)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_text(fields: Mapping[str, str], template: str | None, max_chars: int) -> str:
    """Render ``fields`` with ``template`` (missing fields render empty).

    With no template every non-empty field is written as ``name: value`` joined by ``"; "``
    in the source's field order, e.g. ``title: Toy Story (1995); genres: Comedy``.
    """
    cleaned = {k: clean(v) for k, v in fields.items()}
    if template is None:
        parts = [f"{k.replace('_', ' ')}: {v}" for k, v in cleaned.items() if v]
        text = "; ".join(parts)
    else:
        text = clean(template.format_map(_Blank(cleaned)))
    return text[:max_chars].rstrip()


def content_hash(fields: Mapping[str, str], text: str) -> str:
    """A stable digest of an item's content: changes exactly when its fields or text do."""
    payload = json.dumps({"fields": list(fields.items()), "text": text}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
