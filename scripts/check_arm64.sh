#!/usr/bin/env bash
# `make check-arm64`: does the product's computation give the same bits on arm64 (Apple Silicon's instruction
# set) as on x86-64? Runs `mlx-k2 anchor`, a 3-step no-KV run and a 4-step KV run on the CPU with the
# product's own kernels, natively here (the venv) and on arm64 under user-mode QEMU (the aarch64 MLX wheels,
# the kernels cross-built for aarch64), then compares every step's digests: hidden_digest, logits_digest,
# token_id and each layer's norm_in, norm_out and experts.
#
#   scripts/check_arm64.sh [--model DIR]        (default: the embedded synthetic checkpoint)
#
# Exit 0: the anchor reproduced on arm64 and every step is equal; 1: something differs (listed); 2: the
# check could not run (a missing tool, a failed build or run).
#
# Needs root once, for the arm64 sysroot (debootstrap --foreign; nothing of arm64 runs on the host for it),
# and the host packages qemu-user-static, debootstrap and g++-aarch64-linux-gnu. Makes no system-wide change:
# no binfmt registration, no foreign dpkg architecture; the emulator is invoked explicitly. Everything built
# or fetched (sysroot, wheels, kernels) is kept under ${MLX_K2_CACHE:-~/.cache/mlx_k2}/arm64/, so a second
# run only runs the checks. Both sides run one snapshot of the sources, taken at the start, with the kernels
# built from it (x86-64 by `python -m mlx_k2.kernels.build`, arm64 cross-built from the same CMakeLists.txt),
# kept by the sources' hash: the tree's own mlx_k2/kernels/_ext is neither used nor touched.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-.venv}
[[ $VENV = /* ]] || VENV=$REPO/$VENV
HOST_PY=$VENV/bin/python
HELPER=$REPO/scripts/check_arm64.py
TOOLCHAIN=$REPO/scripts/aarch64-linux-gnu.cmake

CACHE=${MLX_K2_CACHE:-$HOME/.cache/mlx_k2}/arm64
ROOT=$CACHE/sysroot           # Debian bookworm arm64, unpacked (python3.11, libstdc++, python3.11-dev)
WHEELS=$CACHE/wheels          # the downloaded aarch64 wheels
SITE=$CACHE/site              # ... installed (pip install --no-deps --target)
KERN=$CACHE/kernels           # the kernels built from the snapshot: ARCH/out/ID/_ext*.so, ARCH/build/
STAGE=$CACHE/stage            # a snapshot of the sources, one copy per architecture with its _ext
RESULTS=$CACHE/results        # the last check's ledgers and logs
PYARM=$CACHE/bin/python3.11-aarch64   # the emulated interpreter (a generated wrapper)
SUITE=bookworm
PIP_TARGET_TAGS=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
                 --platform manylinux_2_35_aarch64 --platform manylinux_2_28_aarch64
                 --platform manylinux_2_17_aarch64)
MODEL=

while (($#)); do
  case $1 in
    --model) MODEL=${2:?--model needs a directory}; shift 2 ;;
    --model=*) MODEL=${1#--model=}; shift ;;
    -h|--help) sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-arm64: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

T0=$SECONDS
CHILD=
die() { echo "check-arm64: $*" >&2; exit 2; }
stage() { printf '\n== %s\n' "$*"; }
on_signal() {
  [[ -n $CHILD ]] && kill -- "-$CHILD" 2>/dev/null
  echo "check-arm64: interrupted" >&2
  exit 130
}
trap on_signal INT TERM

last_line() {
  local line
  line=$(tail -c 4000 "$1" 2>/dev/null | tr '\r' '\n' | grep -av '^[[:space:]]*$' | tail -n 1 | cut -c 1-110)
  echo "${line:-(no output yet)}"
}

# run_logged LABEL LOG CMD...: run CMD in its own process group with its output in LOG; a progress line every
# 10 s (the elapsed time and the log's last line); on failure the log's tail. Returns CMD's status.
run_logged() {
  local label=$1 log=$2 start=$SECONDS next=10 rc=0
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  CHILD=$!
  while kill -0 "$CHILD" 2>/dev/null; do
    sleep 1
    if ((SECONDS - start >= next)); then
      printf '   .. %s %3ds  %s\n' "$label" $((SECONDS - start)) "$(last_line "$log")"
      next=$((next + 10))
    fi
  done
  wait "$CHILD" || rc=$?
  CHILD=
  if ((rc == 0)); then
    printf '   %s: done in %ds\n' "$label" $((SECONDS - start))
  else
    printf '   %s: FAILED (exit %d after %ds); the end of %s:\n' "$label" "$rc" $((SECONDS - start)) "$log"
    tail -n 15 "$log" | sed 's/^/      /'
  fi
  return $rc
}

hash_files() { (cd "$1" && shift && sha256sum "$@" | sha256sum | cut -c 1-16); }

# ------------------------------------------------------------------------------------------- preflight
stage "preflight"
missing=()
for tool in qemu-aarch64-static debootstrap aarch64-linux-gnu-g++ dpkg setsid flock sha256sum tar; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
((${#missing[@]} == 0)) || die "missing ${missing[*]}: apt-get install qemu-user-static debootstrap g++-aarch64-linux-gnu"
[[ -x $HOST_PY ]] || die "no venv at $VENV (make install)"
CMAKE=$VENV/bin/cmake
[[ -x $CMAKE ]] || CMAKE=$(command -v cmake) || die "no cmake (make install puts one in the venv)"
if [[ -n $MODEL ]]; then
  [[ -d $MODEL ]] || die "no checkpoint directory $MODEL"
  MODEL=$(cd "$MODEL" && pwd)
fi
mkdir -p "$CACHE" "$CACHE/bin"
# Python is only ever started from the cache, and never puts its working or script directory first on
# sys.path: `mlx_k2` must come from the snapshot on PYTHONPATH, never from a source tree it is started in.
cd "$CACHE"
export PYTHONSAFEPATH=1
exec 9>"$CACHE/.lock"
flock -n 9 || die "another check-arm64 is using $CACHE"

echo "   cache $CACHE"
echo "   host  $("$HOST_PY" -c 'import platform; print(platform.machine(), "Python", platform.python_version())') ($VENV)"

# ----------------------------------------------------------------------------------------- arm64 sysroot
if [[ ! -f $ROOT/.mlx_k2-sysroot ]]; then
  ((EUID == 0)) || die "building the arm64 sysroot needs root once (debootstrap); run this as root"
  mirror=$("$HOST_PY" "$HELPER" mirror)
  stage "arm64 sysroot: debootstrap --foreign $SUITE from $mirror"
  rm -rf "$ROOT.tmp"
  mkdir -p "$CACHE/logs"
  run_logged "debootstrap (download and first unpack)" "$CACHE/logs/debootstrap.log" \
    debootstrap --foreign --arch=arm64 --variant=minbase \
      --include=python3,python3-venv,libstdc++6,python3.11-dev "$SUITE" "$ROOT.tmp" "$mirror" || exit 2
  debs=("$ROOT.tmp"/var/cache/apt/archives/*.deb)
  run_logged "dpkg -x of ${#debs[@]} packages" "$CACHE/logs/unpack.log" \
    bash -c 'for d in "$1"/var/cache/apt/archives/*.deb; do echo "${d##*/}"; dpkg -x "$d" "$1" || exit 1; done' _ "$ROOT.tmp" \
    || exit 2
  [[ -x $ROOT.tmp/usr/bin/python3.11 && -f $ROOT.tmp/usr/include/python3.11/Python.h ]] \
    || die "the sysroot has no python3.11 or its headers ($ROOT.tmp)"
  echo "$mirror $SUITE arm64 $(date -u +%FT%TZ)" >"$ROOT.tmp/.mlx_k2-sysroot"
  rm -rf "$ROOT"
  mv "$ROOT.tmp" "$ROOT"
  echo "   downloaded $(du -sh "$ROOT/var/cache/apt/archives" | cut -f 1) of .debs"
else
  stage "arm64 sysroot: cached ($ROOT)"
fi

# The emulated interpreter: QEMU invoked explicitly with the sysroot as its prefix; the wheels on PYTHONPATH
# (then ARM64_STAGE, the source snapshot, when set); bytecode kept in the cache, never beside the sources.
cat >"$PYARM" <<EOF
#!/bin/sh
# Generated by scripts/check_arm64.sh: CPython 3.11 for arm64 under user-mode QEMU.
PYTHONPATH="$SITE\${ARM64_STAGE:+:\$ARM64_STAGE}" PYTHONNOUSERSITE=1 PYTHONPYCACHEPREFIX="$CACHE/pycache/aarch64" \\
  exec qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$PYARM"

# --------------------------------------------------------------------------------------------- wheels
"$HOST_PY" "$HELPER" pins >"$CACHE/pins.txt" || die "cannot list the venv's packages"
if [[ -f $SITE/.pins ]] && cmp -s "$SITE/.pins" "$CACHE/pins.txt"; then
  stage "aarch64 wheels: cached ($(wc -l <"$CACHE/pins.txt") packages at the venv's versions)"
else
  stage "aarch64 wheels: $(wc -l <"$CACHE/pins.txt") packages at the venv's versions"
  mkdir -p "$WHEELS" "$CACHE/logs"
  before=$(du -sb "$WHEELS" | cut -f 1)
  run_logged "pip download" "$CACHE/logs/pip-download.log" \
    "$HOST_PY" -m pip download --no-cache-dir --no-deps --progress-bar off "${PIP_TARGET_TAGS[@]}" -d "$WHEELS" \
      -r "$CACHE/pins.txt" || exit 2
  rm -rf "$SITE.tmp"
  run_logged "pip install --target" "$CACHE/logs/pip-install.log" \
    "$HOST_PY" -m pip install --no-cache-dir --no-deps --no-index --find-links "$WHEELS" "${PIP_TARGET_TAGS[@]}" \
      --target "$SITE.tmp" -r "$CACHE/pins.txt" || exit 2
  cp "$CACHE/pins.txt" "$SITE.tmp/.pins"
  rm -rf "$SITE"
  mv "$SITE.tmp" "$SITE"
  echo "   downloaded $(( ($(du -sb "$WHEELS" | cut -f 1) - before) / 1048576 )) MiB of wheels"
fi
MLX_DIR=$SITE/mlx/share/cmake/MLX
[[ -f $MLX_DIR/MLXConfig.cmake ]] || die "the aarch64 mlx wheel has no CMake package ($MLX_DIR)"

# ---------------------------------------------------------------------------------- source snapshot
# One copy of the pure-Python package, the command line (as mlx_k2_cli) and the anchors, taken now, so both
# architectures run the same sources while the tree changes; each architecture's copy gets its own _ext.
stage "sources: snapshot"
rm -rf "$STAGE"
mkdir -p "$STAGE/src"
tar -C "$REPO" --exclude=__pycache__ --exclude='mlx_k2/kernels/build' --exclude='mlx_k2/kernels/_ext*' \
  -cf - mlx_k2 cli anchors | tar -C "$STAGE/src" -xf -
mv "$STAGE/src/cli" "$STAGE/src/mlx_k2_cli"
cp -a "$STAGE/src" "$STAGE/x86_64"
cp -a "$STAGE/src" "$STAGE/aarch64"
if rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); then
  dirty=$(git -C "$REPO" status --porcelain -- mlx_k2 cli anchors | wc -l)
  ((dirty == 0)) || rev="$rev + $dirty changed or new files"
else
  rev="not a git checkout"
fi
echo "   $REPO ($rev; mlx_k2/, cli/, anchors/) -> $STAGE"

# ------------------------------------------------------------------------------------------ kernels
# Each build is kept under an id: the hash of the kernels' sources in the snapshot and of what else goes into
# it (toolchain, compiler, cmake, the mlx and nanobind versions), so unchanged sources are never rebuilt and
# going back to earlier ones needs no build. The newest KEEP builds of each architecture are kept.
KEEP=8
KSRC=$STAGE/src/mlx_k2/kernels
kfiles=(CMakeLists.txt $(cd "$KSRC" && find src -type f | sort))
sources_id=$(hash_files "$KSRC" "${kfiles[@]}")
# PROBE STAGE_DIR: mlx_k2 comes from that snapshot copy and its kernels load (their name and SIMD path).
PROBE='import sys, mlx_k2.kernels as k
if not k.__file__.startswith(sys.argv[1] + "/"):
    sys.exit(f"mlx_k2 imported from {k.__file__}, not from {sys.argv[1]}")
s = k.status()
print(s.name, s.simd) if s.available else sys.exit(s.reason)'
# fresh DIR: give the kernel sources in DIR the current time before a build. The build directories are reused
# across sources (nanobind's objects stay), and make compares times only: sources copied with older times than
# the last build's objects (an older checkout) would otherwise link that build's objects.
fresh() { find "$1/CMakeLists.txt" "$1/src" -type f -exec touch {} +; }
prune() { ls -1dt "$1"/out/*/ 2>/dev/null | tail -n +$((KEEP + 1)) | xargs -r rm -rf; }

# x86-64: the product's own build (python -m mlx_k2.kernels.build, with the venv's mlx, nanobind and cmake),
# run in the snapshot's x86-64 copy; its build directory (mlx_k2/kernels/build) is kept in the cache.
KX=$KERN/x86_64
x86_config=$( { grep -iE '^(mlx|mlx-cpu|nanobind)==' "$SITE/.pins"; "$CMAKE" --version | head -n 1;
                c++ --version 2>/dev/null | head -n 1; } | sha256sum | cut -c 1-16)
OUTX=$KX/out/$sources_id-$x86_config
extx=$(ls "$OUTX"/_ext*x86_64*.so 2>/dev/null | head -n 1 || true)
if [[ -n $extx && -f $OUTX/.ok ]]; then
  stage "x86-64 kernels: cached ($(basename "$extx"), sources $sources_id)"
else
  stage "x86-64 kernels: python -m mlx_k2.kernels.build (sources $sources_id)"
  [[ -f $KX/build/.config_id && $(cat "$KX/build/.config_id") == "$x86_config" ]] || rm -rf "$KX/build"
  mkdir -p "$KX/build" "$CACHE/logs"
  echo "$x86_config" >"$KX/build/.config_id"
  ln -s "$KX/build" "$STAGE/x86_64/mlx_k2/kernels/build"
  fresh "$STAGE/x86_64/mlx_k2/kernels"
  run_logged "compile" "$CACHE/logs/kernels-x86_64.log" \
    env PYTHONPATH="$STAGE/x86_64" PYTHONPYCACHEPREFIX="$CACHE/pycache/x86_64" MLX_K2_REQUIRE_KERNELS=1 \
      "$HOST_PY" -m mlx_k2.kernels.build || exit 2
  rm "$STAGE/x86_64/mlx_k2/kernels/build"
  rm -rf "$OUTX"
  mkdir -p "$OUTX"
  cp -a "$STAGE"/x86_64/mlx_k2/kernels/_ext*.so "$OUTX/"
  extx=$(ls "$OUTX"/_ext*x86_64*.so 2>/dev/null | head -n 1 || true)
  [[ -n $extx ]] || die "the x86-64 build produced no _ext (log $CACHE/logs/kernels-x86_64.log)"
  touch "$OUTX/.ok"
  prune "$KX"
fi
rm -f "$STAGE"/x86_64/mlx_k2/kernels/_ext*
cp -a "$extx" "$STAGE/x86_64/mlx_k2/kernels/"
probe=$(PYTHONPATH=$STAGE/x86_64 PYTHONPYCACHEPREFIX=$CACHE/pycache/x86_64 "$HOST_PY" -c "$PROBE" "$STAGE/x86_64" 2>&1) \
  || die "the x86-64 kernels do not load: $probe"
echo "   $(basename "$extx"): $probe"

# arm64: the same CMakeLists.txt cross-built with aarch64-linux-gnu-g++ against the aarch64 mlx wheel.
KA=$KERN/aarch64
arm_config=$( { cat "$TOOLCHAIN" "$SITE/.pins"; aarch64-linux-gnu-g++ --version | head -n 1;
                "$CMAKE" --version | head -n 1; } | sha256sum | cut -c 1-16)
OUT=$KA/out/$sources_id-$arm_config
ext=$(ls "$OUT"/_ext*aarch64*.so 2>/dev/null | head -n 1 || true)
if [[ -n $ext && -f $OUT/.ok ]]; then
  stage "arm64 kernels: cached ($(basename "$ext"), sources $sources_id)"
else
  stage "arm64 kernels: cross-build (aarch64-linux-gnu-g++, mlx_k2/kernels/CMakeLists.txt, sources $sources_id)"
  mkdir -p "$CACHE/logs"
  rm -rf "$OUT"
  mkdir -p "$OUT"
  # A new toolchain, compiler or mlx wheel: configure afresh; changed sources alone build incrementally.
  [[ -f $KA/build/.config_id && $(cat "$KA/build/.config_id") == "$arm_config" ]] || rm -rf "$KA/build"
  mkdir -p "$KA/build"
  # Python_EXECUTABLE is the emulated interpreter (nanobind runs it; FindPython checks its version); when
  # cross-compiling FindPython reads the rest from a python-config, which Python_ROOT_DIR makes the sysroot's
  # (the arm64 SOABI). The headers are python3.11-dev's in the sysroot, with Debian's multiarch pyconfig.h
  # replaced by the aarch64 one it would include (the cross compiler does not search the sysroot's
  # /usr/include). The compile flags are CMakeLists.txt's own (-O3, -fno-fast-math, -ffp-contract=off).
  rm -rf "$KA/python-include"
  mkdir -p "$KA/python-include"
  ln -s "$ROOT"/usr/include/python3.11/* "$KA/python-include/"
  rm "$KA/python-include/pyconfig.h"
  cp "$ROOT/usr/include/aarch64-linux-gnu/python3.11/pyconfig.h" "$KA/python-include/"
  fresh "$KSRC"
  run_logged "cmake configure" "$CACHE/logs/kernels-aarch64-configure.log" \
    "$CMAKE" -S "$KSRC" -B "$KA/build" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$PYARM" -DPython_ROOT_DIR="$ROOT/usr" -DPython_INCLUDE_DIR="$KA/python-include" \
      -DMLX_DIR="$MLX_DIR" -DMLX_K2_OUTPUT_DIR="$OUT" || exit 2
  echo "$arm_config" >"$KA/build/.config_id"
  run_logged "compile" "$CACHE/logs/kernels-aarch64.log" \
    "$CMAKE" --build "$KA/build" -j "$(nproc)" || exit 2
  ext=$(ls "$OUT"/_ext*aarch64*.so 2>/dev/null | head -n 1 || true)
  [[ -n $ext ]] || die "the cross-build produced no aarch64 _ext in $OUT (log $CACHE/logs/kernels-aarch64.log)"
  touch "$OUT/.ok"
  prune "$KA"
fi
cp -a "$ext" "$STAGE/aarch64/mlx_k2/kernels/"
# It must load in the emulated interpreter beside the aarch64 mlx, and pick the NEON path.
probe=$(ARM64_STAGE=$STAGE/aarch64 "$PYARM" -c "$PROBE" "$STAGE/aarch64" 2>&1) \
  || die "the arm64 kernels do not load under QEMU: $probe"
echo "   $(basename "$ext"): $probe"

# --------------------------------------------------------------------------------------------- runs
rm -rf "$RESULTS"
mkdir -p "$RESULTS/x86_64" "$RESULTS/aarch64"
OWN=(--device cpu --kernels own)

# cli ARCH ARGS...: `mlx-k2 ARGS` on ARCH, from the snapshot (python -m mlx_k2_cli is the mlx-k2 command).
cli() {
  local arch=$1
  shift
  if [[ $arch == x86_64 ]]; then
    (cd "$RESULTS" && COLUMNS=160 PYTHONPATH=$STAGE/x86_64 PYTHONPYCACHEPREFIX=$CACHE/pycache/x86_64 \
       exec "$HOST_PY" -m mlx_k2_cli "$@")
  else
    (cd "$RESULTS" && COLUMNS=160 ARM64_STAGE=$STAGE/aarch64 exec "$PYARM" -m mlx_k2_cli "$@")
  fi
}
export -f cli
export RESULTS STAGE CACHE HOST_PY PYARM

# run_all ARCH LABEL: the anchor, then the no-KV and KV runs; a failed run is reported, not fatal.
run_all() {
  local arch=$1 label=$2 model=(--model "$MODEL_DIR") rc=0
  run_logged "$label anchor" "$RESULTS/$arch/anchor.log" bash -c 'cli "$@"' _ "$arch" anchor "${OWN[@]}" \
    "${model[@]}" || rc=$?
  echo "$rc" >"$RESULTS/$arch/anchor.rc"
  run_logged "$label no-KV, 3 steps" "$RESULTS/$arch/nokv.log" bash -c 'cli "$@"' _ "$arch" run "${OWN[@]}" \
    "${model[@]}" --max-new-tokens 3 --no-dashboard --overwrite --ledger "$RESULTS/$arch/nokv.jsonl" || true
  run_logged "$label KV, 4 steps" "$RESULTS/$arch/kv.log" bash -c 'cli "$@"' _ "$arch" run "${OWN[@]}" \
    "${model[@]}" --kv-cache --max-new-tokens 4 --cache 0 --no-dashboard --overwrite \
    --ledger "$RESULTS/$arch/kv.jsonl" || true
}

stage "checkpoint"
if [[ -n $MODEL ]]; then
  MODEL_DIR=$MODEL
else
  # The command line's own default (built once into the cache by a first `mlx-k2 run`): a 1-token run on
  # x86-64 says where it is, in its ledger header.
  run_logged "default checkpoint" "$RESULTS/x86_64/checkpoint.log" bash -c 'cli "$@"' _ x86_64 run "${OWN[@]}" \
    --max-new-tokens 1 --no-dashboard --quiet --overwrite --ledger "$RESULTS/x86_64/checkpoint.jsonl" || exit 2
  MODEL_DIR=$("$HOST_PY" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["model"]["path"])' \
    "$RESULTS/x86_64/checkpoint.jsonl") || die "no model path in $RESULTS/x86_64/checkpoint.jsonl"
fi
echo "   $MODEL_DIR"

stage "x86-64 runs (native, $VENV)"
run_all x86_64 x86-64
stage "arm64 runs (qemu-aarch64-static; about 12 s a step, 60 s the anchor)"
run_all aarch64 arm64

# ------------------------------------------------------------------------------------------ compare
stage "comparison: x86-64 vs arm64 (ledgers and logs in $RESULTS)"
rc=0
"$HOST_PY" "$HELPER" compare "$RESULTS" || rc=$?
echo "   ($((SECONDS - T0)) s in all)"
exit "$rc"
