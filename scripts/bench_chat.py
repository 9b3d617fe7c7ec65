"""The kept KV cache, measured: a 2-turn chat on the full-width checkpoint (K2.5's widths, LAYERS layers), its
second turn taken up by `ChatSession.resume` with the kept KV cache and without it (the file deleted: the first
turn's steps are recomputed first). Prints, for each, the seconds and bytes of taking the session up and of
the second turn, and the ratio. Usage: .venv/bin/python scripts/bench_chat.py [LAYERS] [REPLY_TOKENS]

Both resumes read the same files, the first turn having read them once: the page cache is warm for both.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from mlx_k2.bench.streaming import build_full_width
from mlx_k2.run.chat import ChatSession
from mlx_k2.run.spec import RunSpec
from mlx_k2.synth.checkpoint import cache_root

FIRST = ("Here is a long first message so that the conversation has a prefix worth keeping: " +
         "the quick brown fox jumps over the lazy dog; " * 12)
SECOND = "And a short second one."


def resumed_turn(ledger: Path, label: str) -> dict:
    started = time.perf_counter()
    session = ChatSession.resume(ledger, device="cpu")
    took_up, up_bytes = time.perf_counter() - started, session.model.reader.bytes_read
    started = time.perf_counter()
    reply = session.turn(SECOND)
    turn_s = time.perf_counter() - started
    session.close()
    row = {"label": label, "kv": session.kept_from, "take_up_s": took_up, "take_up_gb": up_bytes / 1e9,
           "turn_s": turn_s, "turn_gb": sum(s.bytes_read for s in reply.steps) / 1e9,
           "positions": reply.steps[0].positions, "context": len(reply.steps[0].input_ids)}
    print(f"{label:<26} KV cache {row['kv']:<10} take-up {took_up:7.2f} s {row['take_up_gb']:7.2f} GB   "
          f"turn 2 {turn_s:7.2f} s {row['turn_gb']:6.2f} GB ({row['positions']} of {row['context']} positions)",
          flush=True)
    return row


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    reply_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    print(f"building or reusing the {layers}-layer full-width checkpoint under {cache_root() / 'bench'}", flush=True)
    model = build_full_width(cache_root() / "bench", layers)
    spec = RunSpec.from_options("cpu", None, kv_cache=True, cache_bytes=0)
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "first" / "chat.jsonl"
        session = ChatSession(model, spec, reply_tokens, first)
        started = time.perf_counter()
        reply = session.turn(FIRST)
        session.close()
        print(f"turn 1: {reply.steps[0].positions} prompt positions, {len(reply.steps)} reply tokens, "
              f"{time.perf_counter() - started:.2f} s, {sum(s.bytes_read for s in reply.steps) / 1e9:.2f} GB",
              flush=True)
        copies = {}
        for name in ("kept", "recomputed"):
            shutil.copytree(first.parent, Path(tmp) / name)
            copies[name] = Path(tmp) / name / "chat.jsonl"
        (Path(tmp) / "recomputed" / "chat.kv.safetensors").unlink()
        without = resumed_turn(copies["recomputed"], "without the kept cache")
        kept = resumed_turn(copies["kept"], "with the kept cache")
    total = lambda r: r["take_up_s"] + r["turn_s"]  # noqa: E731
    print(f"second turn, take-up included: {total(without):.2f} s without, {total(kept):.2f} s with "
          f"({total(without) / total(kept):.1f}x); bytes read {without['take_up_gb'] + without['turn_gb']:.2f} GB "
          f"without, {kept['take_up_gb'] + kept['turn_gb']:.2f} GB with")


if __name__ == "__main__":
    main()
