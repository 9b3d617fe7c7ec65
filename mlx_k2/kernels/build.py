"""`python -m mlx_k2.kernels.build`: compile the CPU kernels (`_ext`) against the installed mlx, in place.

Configures and builds CMakeLists.txt beside this file with the interpreter running it (so mlx, nanobind and
the ABI are the installed ones) into a build directory under build/ (gitignored), and leaves `_ext*.so` in
mlx_k2/kernels/. One line on success. On failure (no compiler, no cmake, a nanobind MLX cannot share arrays
with) one warning line and exit 0, so an install never fails for want of the kernels; MLX_K2_REQUIRE_KERNELS=1
makes that exit 1. It does not decide whether the kernels are used.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    pass


def build_dir() -> Path:
    """Under the repository's build/ when run from a checkout, else under the package (both ignored)."""
    root = HERE.parents[1]
    base = root / "build" if (root / "pyproject.toml").is_file() else HERE / "build"
    return base / f"kernels-{sysconfig.get_platform()}-py{sys.version_info.major}{sys.version_info.minor}"


def cmake_exe() -> str:
    # The pip `cmake` wheel first: a system cmake may be older than the minimum.
    try:
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.is_file():
            return str(exe)
    except Exception:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise BuildError("no cmake (pip install cmake)")
    return exe


def check_nanobind() -> None:
    """MLX's arrays cross into the module only if its nanobind internals key matches the installed nanobind's
    (same internals version and backend ABI); a 2.x nanobind builds fine and then every call fails."""
    import mlx.core  # noqa: F401  (registers the key)

    try:
        import nanobind
    except ImportError:
        raise BuildError("no nanobind (pip install 'nanobind>=3,<4')") from None
    api = ctypes.pythonapi
    api.PyInterpreterState_Get.restype = ctypes.c_void_p
    api.PyInterpreterState_GetDict.restype = ctypes.py_object
    api.PyInterpreterState_GetDict.argtypes = [ctypes.c_void_p]
    keys = [k for k in api.PyInterpreterState_GetDict(api.PyInterpreterState_Get())
            if isinstance(k, str) and k.startswith("__nb_internals_") and k.endswith("_mlx__")]
    root = Path(nanobind.__file__).parent
    src = "".join(p.read_text() for p in (root / "src").glob("nb_*.h"))
    inc = "".join(p.read_text() for p in (root / "include" / "nanobind").glob("nb_*.h"))
    internals = re.search(r"define NB_INTERNALS_VERSION (\d+)", src)
    abi = re.search(r"define NB_BACKEND_ABI_MAJOR (\d+)", inc)
    if not keys or internals is None:
        raise BuildError(f"cannot read mlx's or nanobind {nanobind.__version__}'s ABI key")
    want = f"_a{abi.group(1)}_v{internals.group(1)}_" if abi else f"_nb_internals_v{internals.group(1)}_"
    if want not in keys[0]:
        raise BuildError(f"nanobind {nanobind.__version__} does not match mlx's ({keys[0]}); "
                         "pip install 'nanobind>=3,<4'")


def _run_showing_progress(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd`, echoing its `[ NN%] Building ...` lines as they come (a compile takes 30 s to a few minutes:
    the install is never silent that long); return its exit status and whole output."""
    try:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise BuildError(f"{Path(cmd[0]).name}: {e}") from None
    output = []
    for line in process.stdout:
        output.append(line)
        if re.match(r"\[\s*\d+%\]", line):
            print(f"  kernels {line.strip()}", flush=True)
    return process.wait(), "".join(output)


def build() -> Path:
    """Build and return the path of the module; raises BuildError with a one-line reason."""
    for old in HERE.glob("_ext*.so"):
        old.unlink()  # first: a failed build must not leave a module built against another mlx
    import mlx

    check_nanobind()
    mlx_dir = Path(mlx.__path__[0]) / "share" / "cmake" / "MLX"
    if not mlx_dir.is_dir():
        raise BuildError(f"the installed mlx has no CMake package ({mlx_dir})")
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    cmake = cmake_exe()
    configure = [cmake, "-S", str(HERE), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-DMLX_DIR={mlx_dir}", f"-DMLX_K2_OUTPUT_DIR={HERE}"]
    for cmd in (configure, [cmake, "--build", str(out), "-j", str(os.cpu_count() or 2)]):
        returncode, output = _run_showing_progress(cmd)
        if returncode != 0:
            (out / "last-error.log").write_text(output)
            lines = [l for l in output.splitlines() if l.strip()]
            first = next((l for l in lines if "error" in l.lower()), lines[0] if lines else "failed")
            raise BuildError(f"{'configure' if cmd is configure else 'compile'} failed: {first.strip()} "
                             f"(full log: {out / 'last-error.log'})")
    built = sorted(HERE.glob("_ext*.so")) + sorted(HERE.glob("_ext*.pyd"))
    if not built:
        raise BuildError(f"the build produced no _ext module in {HERE}")
    return built[0]


def main() -> int:
    start = time.monotonic()
    print("building the mlx_k2 CPU kernels (C++, about 30 s on 16 cores, 1-3 minutes on 2)", flush=True)
    try:
        path = build()
    except Exception as e:  # BuildError, a missing mlx, anything: one line, never a failed install
        print(f"WARNING: mlx_k2 CPU kernels not built ({type(e).__name__}: {e}); the MLX built-ins will be used",
              file=sys.stderr)
        return 1 if os.environ.get("MLX_K2_REQUIRE_KERNELS") == "1" else 0
    print(f"mlx_k2 CPU kernels built: {path.name} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
