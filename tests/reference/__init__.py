"""Helpers that import the real avici package (installed under .ref/) for reference tests."""
