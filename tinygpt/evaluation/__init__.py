"""Evaluation suites (the synthetic shapes suite lives in shapes.py)."""
