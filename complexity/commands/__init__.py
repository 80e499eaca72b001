"""Subcommands of the `complexity` CLI, one module per command group."""
