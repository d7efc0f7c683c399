"""Benchmarks of code models: suites, sampling through an OpenAI-compatible server, a sandbox, pass@k."""
