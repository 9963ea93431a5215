"""Pipelines the CLI dispatches to: participant, group and training levels."""
