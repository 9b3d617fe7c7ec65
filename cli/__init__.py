"""The `mlx-k2` command line: thin typer commands over the mlx_k2 library."""
