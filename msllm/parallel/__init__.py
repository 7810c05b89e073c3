"""Parallelism applied to plain models from outside (see sequence.py)."""
