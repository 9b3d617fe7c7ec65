"""The vindex: SVD feature databases of a checkpoint's experts in the published format, built by streaming,
and their links to runs (routing statistics from ledgers, the feature directions a step's MoE input projects onto)."""
