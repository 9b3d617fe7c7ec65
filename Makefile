# Set-up and everyday commands. `make install` once, then `make run` / `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?=
ARGS ?=

DEVICE ?= cpu

.PHONY: install run run-distributed test test-all anchor bench bench-decode clean check-arm64

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/python -m mlx_k2.kernels.build

# The default job: 5 tokens from BOS on the embedded synthetic checkpoint (built once into the cache).
run:
	$(BIN)/mlx-k2 run --max-new-tokens 5 $(if $(MODEL),--model $(MODEL)) $(ARGS)

# The default job pipelined over 2 ranks on this machine (mlx.launch, ring backend over 127.0.0.1): rank 0
# embeds, writes the ledger and prints; each rank streams and caches only its own layers. See the README for
# several Macs (a hostfile instead of -n 2).
RANKS ?= 2
run-distributed:
	$(BIN)/mlx.launch -n $(RANKS) --backend ring --python $(BIN)/python $(BIN)/mlx-k2 run --distributed \
		--max-new-tokens 5 $(if $(MODEL),--model $(MODEL)) $(ARGS)

# Reproduce the frozen anchor (capture off and on, bit for bit). MODEL=DIR for a real checkpoint.
anchor:
	$(BIN)/mlx-k2 anchor --device $(DEVICE) $(if $(MODEL),--model $(MODEL)) $(ARGS)

# Full-width streaming benchmark (builds ~35 GB once in the cache; minutes). Not part of the tests.
bench:
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/mlx-k2 bench --layers 3 --tokens 3 --json bench.json $(ARGS)

# Decode modes over 16 tokens on the same full-width checkpoint: no-KV, KV, KV + weight cache (non-expert
# weights; + experts, lru and lfu), KV + cache + look-ahead, each in its own process (10-20 minutes).
bench-decode:
	$(BIN)/mlx-k2 bench --decode --layers 3 --tokens 16 --json bench-decode.json $(if $(MODEL),--model $(MODEL)) $(ARGS)

# The tests CI runs (under 10 minutes on 2 cores): every behaviour once; tests marked `slow` are left out.
test:
	$(BIN)/python -m pytest -q

# Every test, the slow ones too: full-width duplicates of behaviours `make test` checks on smaller cases, a third
# pipelined launch, and the property tests with more examples each (hypothesis profile "thorough").
test-all:
	$(BIN)/python -m pytest -q -m '' --hypothesis-profile thorough

# Same bits on arm64 as on x86-64: the anchor, a 3-step no-KV and a 4-step KV run on the CPU under user-mode QEMU
# (aarch64 MLX wheels, the kernels cross-built for aarch64) against the same runs here, step by step. Needs root
# once and qemu-user-static, debootstrap, g++-aarch64-linux-gnu; caches under the cache dir's arm64/. Minutes.
check-arm64:
	VENV=$(VENV) scripts/check_arm64.sh $(if $(MODEL),--model $(MODEL))

clean:
	rm -rf runs .pytest_cache
