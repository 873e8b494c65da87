"""Source format readers: one module per ``data.format``, each ``read(cfg, path)``.

Every reader returns a :class:`RawCatalog` (see :mod:`store_core.readers.base` for the
contract); :func:`read_source` picks the reader for ``cfg.format``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from store_core.config import DataConfig
from store_core.errors import ConfigError
from store_core.readers import amazon, lcrec, movielens, p5, recbole, tabular
from store_core.readers.base import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, RawCatalog
from store_core.readers.fsutil import check_source
from store_core.redaction import redact

logger = logging.getLogger(__name__)

Reader = Callable[[DataConfig, str], RawCatalog]

#: ``data.format`` -> reader.
READERS: dict[str, Reader] = {
    "movielens": movielens.read,
    "lcrec": lcrec.read,
    "recbole": recbole.read,
    "p5": p5.read,
    "amazon": amazon.read,
    "tabular": tabular.read,
}


def read_source(cfg: DataConfig, path: str) -> RawCatalog:
    """Read the source directory ``path`` (an fsspec URI) with the reader for ``cfg.format``.

    Raises ConfigError for an unknown format and DataError (naming file, record and
    field) for a source that cannot be accessed (e.g. a symlink loop) or read.
    """
    try:
        reader = READERS[cfg.format]
    except KeyError:
        known = ", ".join(sorted(READERS))
        raise ConfigError(f"unknown data.format '{cfg.format}' (known: {known})") from None
    logger.info("reading %s source from %s", cfg.format, redact(path))
    check_source(path)
    catalog = reader(cfg, path)
    logger.info(
        "read %d items from %s and %d interactions from %s",
        catalog.items.num_rows,
        redact(catalog.items_file),
        catalog.interactions.num_rows,
        redact(catalog.interactions_file),
    )
    return catalog


__all__ = [
    "RAW_INTERACTIONS_SCHEMA",
    "RAW_ITEMS_SCHEMA",
    "READERS",
    "RawCatalog",
    "Reader",
    "read_source",
]
