"""``python -m nnsteer`` runs the CLI."""

from nnsteer.cli import main

main()
