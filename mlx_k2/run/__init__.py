"""A run: its settings, the step loop, its sinks, pipelined ranks, replay and the anchor pass."""
