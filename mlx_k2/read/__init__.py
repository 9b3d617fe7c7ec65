"""Bytes to arrays: storage reads, reusable buffers, the tensor reader and the weight cache."""
