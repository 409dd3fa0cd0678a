"""``python -m dispatcher`` runs the ``eventswarm`` command."""

from dispatcher.cli import main

main()
