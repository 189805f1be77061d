"""Benchmarks against systemd-nspawn and LXC (run as root; not part of the test suite)."""
