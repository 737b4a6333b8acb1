"""Helpers for the test suite: real redis-server, sidecar and mock-upstream processes."""
