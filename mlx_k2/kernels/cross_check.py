"""`python -m mlx_k2.kernels.cross_check`: compile the kernels' C++ for arm64 (Linux and macOS) with zig's
clang (`pip install ziglang`), a syntax and type check of the NEON path from a machine that is not arm64.

Object files only, into a temporary directory, against the installed mlx's headers; nothing links or runs
(tests/test_kernels_neon.py runs the NEON path through SIMDe). A small extra source asserts that the build
chose NEON. One line per target; exit 1 if any fails. Neither the build nor the tests use this.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"
TARGETS = ("aarch64-linux-gnu", "aarch64-macos")
# bindings.cpp needs the target's Python headers
SOURCES = ("common.cpp", "int4.cpp", "fp8.cpp", "dense.cpp", "batched.cpp", "pointwise.cpp")
CHOSE_NEON = ('#include "simd8.h"\n'
              'static_assert(mlx_k2::kSimdPath == mlx_k2::Simd::Neon, "this arm64 build has no NEON path");\n')


def compile_for(target: str, work: Path) -> str:
    """"" when every source compiles for target, else the first error line."""
    import mlx

    probe = work / "chose_neon.cpp"
    probe.write_text(CHOSE_NEON)
    for src in (*[SRC / s for s in SOURCES], probe):
        cmd = [sys.executable, "-m", "ziglang", "c++", "-target", target, "-std=c++20", "-O2", "-fno-fast-math",
               "-ffp-contract=off", "-Wall", "-c", f"-I{SRC}", "-isystem", str(Path(mlx.__path__[0]) / "include"),
               str(src), "-o", str(work / f"{target}-{src.stem}.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [l for l in done.stderr.splitlines() if "error" in l] or done.stderr.splitlines() or ["failed"]
            return f"{src.name}: {lines[0].strip()}"
    return ""


def main() -> int:
    try:
        import ziglang  # noqa: F401
    except ImportError:
        print("cross_check needs zig's clang: pip install ziglang", file=sys.stderr)
        return 1
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for target in TARGETS:
            why = compile_for(target, Path(tmp))
            failed += bool(why)
            print(f"{target}: {'ok' if not why else 'FAILED ' + why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
