"""One rank of a test's `mlx.launch` group: the `mlx-k2` command line, with faults the tests ask for.

mlx.launch runs the same command on every rank and says which rank it is in MLX_RANK. The tests set:
- MLX_K2_TEST_MODEL_<rank>: this rank opens that checkpoint instead of the `--model` given;
- MLX_K2_TEST_FAULT=<rank>:<step>:<layer>:exit|hang: that rank exits (os._exit) or stops answering
  (sleeps) just before computing that layer of that step.
"""

from __future__ import annotations

import os
import sys
import time

rank = os.environ.get("MLX_RANK", "0")
model = os.environ.get(f"MLX_K2_TEST_MODEL_{rank}")
if model is not None:
    sys.argv[sys.argv.index("--model") + 1] = model

fault = os.environ.get("MLX_K2_TEST_FAULT")
if fault:
    fault_rank, fault_step, fault_layer, action = fault.split(":")
    if fault_rank == rank:
        from mlx_k2.run import runner

        computed = runner.Model.layer
        steps_seen = {"layer 0 count": 0}

        def layer(self, i, *args, **kwargs):
            if i == self.owned[0]:
                steps_seen["layer 0 count"] += 1  # one more step reached this rank
            if steps_seen["layer 0 count"] - 1 == int(fault_step) and i == int(fault_layer):
                if action == "exit":
                    os._exit(17)
                time.sleep(3600)
            return computed(self, i, *args, **kwargs)

        runner.Model.layer = layer

from mlx_k2_cli.main import app  # noqa: E402

app(prog_name="mlx-k2")
