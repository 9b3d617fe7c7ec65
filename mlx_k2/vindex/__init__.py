"""The vindex: SVD feature databases of a checkpoint's experts, built by streaming the shards once.

`svd` holds the numerics (top singular values and right singular vectors of one expert matrix),
`build` the streaming build and its files, `routing` the routing statistics from ledgers and bundles,
`features` which feature directions a step's MoE input projects onto.
"""
