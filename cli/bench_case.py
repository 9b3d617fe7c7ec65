"""One benchmark measurement in its own process: `python -m mlx_k2_cli.bench_case DIR TOKENS COLD PART
[METHOD [KERNELS]]`; prints the figures as one JSON line (see mlx_k2.bench.streaming.measure; PART "mlx-lm" runs the
peer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlx_k2.bench.streaming import measure, mlx_lm_step
from mlx_k2.read.storage import ReadPolicy


def main() -> None:
    model_dir, tokens, cold, part = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "cold", sys.argv[4]
    method = sys.argv[5] if len(sys.argv) > 5 else "pread"
    kernels = sys.argv[6] if len(sys.argv) > 6 else None
    if part == "mlx-lm":
        result = mlx_lm_step(model_dir, tokens)
    else:
        result = measure(model_dir, tokens, cold, part, ReadPolicy(method=method), kernels)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
