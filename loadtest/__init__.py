"""Benchmarks and load tests. Speed is shown here, never by timed assertions in tests."""
