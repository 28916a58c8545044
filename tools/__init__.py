"""Tooling outside the serving package: process management for tests, the benchmark and the load test, and checks
that run beside the server (GPU check, wheels), never inside it."""
