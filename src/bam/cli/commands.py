"""Imports every command module so that each registers its commands on :data:`bam.cli.app`.

One line per module; a module adds its own Typer group or command.
"""
