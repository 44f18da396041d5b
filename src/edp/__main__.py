"""``python -m edp`` runs the command line."""

from edp.cli import main

main()
