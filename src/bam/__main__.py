"""``python -m bam`` runs the CLI."""

from bam.cli import main

main()
