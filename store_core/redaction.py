"""Credentials out of everything STORE logs or tracks.

Config values are URIs the user may have written credentials into: a ``tracking.uri`` of
``https://user:token@mlflow.example``, a ``data.path`` of ``s3://KEY:SECRET@bucket/x``, a
database DSN ``postgresql://user:pw@host/db`` or a signed URL ``...?X-Amz-Signature=...``.
:func:`redact` replaces the user-info part of every URI (``scheme://***@host/...``, also
with the scheme stripped, ``/***@bucket/x``, as fsspec logs paths) and
the value of every secret-looking key=value pair (``password=***``, ``token=***``,
``sig=***``) in a text; :func:`redact_value` does it through nested dicts and lists.
MLflow params, tags and text artifacts go through it (:mod:`store_core.tracking`), and
:class:`RedactingFilter` does it for log records on any handler it is added to.

Redaction errs on the side of hiding: a password with an unencoded ``/`` or ``@`` is
hidden whole, and a URI that merely has an ``@`` after a ``host:port`` loses its middle.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

#: What replaces a secret.
MASK = "***"

# Characters that end a URI or a value in the texts we see (quotes from repr/JSON).
_END = r"\s\"'<>`"

# scheme://USERINFO@ where USERINFO is either user:password (the password may hold '/'
# and '@', so it runs to the last '@' of the URI) or a bare user/token without '/'.
_USERINFO = re.compile(
    rf"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
    rf"(?:[^{_END}/?#@]*:[^{_END}?#]*|[^{_END}/?#]+)@"
)

# user:password@ with the scheme already stripped, as fsspec logs paths (the password
# may hold '/' and '@', as in the URI form; 'scheme://' itself is not user info)
# ("info: /KEY:SECRET@bucket/x"): after a '/', whitespace, a quote or the start.
_BARE_USERINFO = re.compile(rf"(?:(?<=[/\s\"'=(\[])|^)[^{_END}/?#@:]+:(?!/)[^{_END}?#]*@")

# key=value pairs whose key names a secret: in query strings (?a=1&token=x), DSNs
# ("host=h password=x") and command lines (--db-password=x).
_SECRET_NAME = (
    r"[\w.\-]*(?:password|passwd|secret|token|credential|signature|"
    r"api[_\-]?key|access[_\-]?key|account[_\-]?key|private[_\-]?key)[\w.\-]*"
    r"|pwd|pass|sig|key|sas|auth"
)
_SECRET_PAIR = re.compile(
    rf"(?P<name>(?<![\w.\-])(?:{_SECRET_NAME}))(?P<eq>\s*=\s*)(?P<value>[^&;{_END}]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with URI credentials and secret key=value pairs replaced by ``***``.

    ``s3://KEY:SECRET@bucket/x`` -> ``s3://***@bucket/x``;
    ``https://h/p?a=1&token=abc`` -> ``https://h/p?a=1&token=***``. Raises nothing.
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _BARE_USERINFO.sub(f"{MASK}@", text)
    return _SECRET_PAIR.sub(lambda m: f"{m['name']}{m['eq']}{MASK}", text)


def redact_value(value: Any) -> Any:
    """:func:`redact` applied to every string in ``value`` (nested dicts, lists, tuples);
    other values are returned as they are. Dict keys are kept. Raises nothing."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message (and exception text).

    Add it to a *handler* (``handler.addFilter(RedactingFilter())``) so it sees records
    from every logger, mlflow's and prefect's included; added to a logger it only sees
    that logger's own records.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
