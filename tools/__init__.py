"""Tooling outside the serving package: checks and helpers that run beside the server, never inside it."""
