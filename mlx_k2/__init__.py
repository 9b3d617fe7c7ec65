"""mlx_k2: run Kimi K2.5-class MoE checkpoints layer by layer, streaming weights, with a formation ledger."""

__version__ = "0.1.0"
