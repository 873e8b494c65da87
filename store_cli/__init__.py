"""The ``store`` command line, outside the library.

``store_core`` is the library (no CLI, no Prefect); ``flows`` orchestrates it with
Prefect; this package is the user-facing layer above both: :mod:`store_cli.app` defines
the verbs, and only ``store run`` imports ``flows`` (when it runs). ``python -m store_cli``
is the same as ``store`` (the launchers, ``deepspeed --module store_cli``, use it).
"""
