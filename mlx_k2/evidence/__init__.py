"""The ledger as evidence: its schema, the records a run writes, reading a ledger or bundle, the derived
values and digests, `verify`, anchors and the explorer page.

Nothing in this package imports MLX (tests/test_evidence_without_mlx.py blocks it and runs verify and the
explorer), so a ledger can be checked and explored on a machine that cannot run the model. Running the
model and emitting the events these records are built from is the rest of `mlx_k2`.
"""
