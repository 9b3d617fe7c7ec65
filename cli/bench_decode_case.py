"""One decode-benchmark configuration in its own process: `python -m mlx_k2_cli.bench_decode_case DIR SPEC`,
SPEC a JSON object of `mlx_k2.bench.decode.decode_case`'s keyword arguments (or {"compute_alone": true,
"tokens": N}, or {"mlx_lm": true, "tokens": N}: the peer); prints the figures as one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlx_k2.bench.decode import compute_alone, decode_case, mlx_lm_decode


def main() -> None:
    model_dir, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    if spec.pop("mlx_lm", False):
        result = mlx_lm_decode(model_dir, spec["tokens"])
    elif spec.pop("compute_alone", False):
        result = compute_alone(model_dir, spec["tokens"], spec.get("kernels"))
    else:
        result = decode_case(model_dir, **spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
