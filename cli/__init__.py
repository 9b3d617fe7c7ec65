"""The `mlx-k2` command line (installed as the package `mlx_k2_cli`): thin typer commands over the library."""
