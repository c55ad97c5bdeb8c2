"""Galley's server: ASGI app, settings, persistence, the sync engine and the CLI."""
