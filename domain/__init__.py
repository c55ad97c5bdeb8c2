"""Galley's business objects and rules: pure Python, standard library only."""
