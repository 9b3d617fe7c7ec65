"""Synthetic checkpoints in the exact formats, for tests, benchmarks and the default run."""
