"""Conflict detection, merge policies and the flagged-conflict workflow (pure Python)."""
