"""Bridges between Complexity and checkpoints or frameworks written by other projects."""
