"""Benchmarks: full-width streaming and decode modes, with measured figures."""
