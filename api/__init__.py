"""/api/v1: the online-only REST API (accounts, payments, reports)."""
