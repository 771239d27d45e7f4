"""Helpers for the project's tests: tiny tokenizers and random checkpoints built offline."""
