"""Runnable examples on real data (``python -m examples.NAME``); they land in later issues."""
