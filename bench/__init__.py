"""Benchmarks: each module prints one JSON object to stdout and a short summary to stderr."""
