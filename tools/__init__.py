"""Tooling around the serving package: process management for tests, the benchmark and the load test."""
