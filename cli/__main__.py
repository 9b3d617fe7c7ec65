"""`python -m mlx_k2_cli`: the same as the `mlx-k2` command."""
from .main import main

main()
