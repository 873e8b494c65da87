"""``python -m store_cli ...`` runs the ``store`` command line."""

from store_cli.app import app

app(prog_name="store")
