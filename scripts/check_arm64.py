"""Helpers of scripts/check_arm64.sh (`make check-arm64`), run with the host venv's python.

  mirror              the Debian mirror of this machine's apt sources (bookworm, plain deb lines)
  pins                the name==version pins of what `mlx-k2` imports at run time (the venv's exact versions)
  compare RESULTS     the per-run, per-step table of the x86-64 and arm64 ledgers; exit 0 all equal,
                      1 a difference, 2 a run that failed or is missing
"""

from __future__ import annotations

import glob
import json
import re
import struct
import sys
from pathlib import Path

SUITE = "bookworm"

# The product's run-time requirements come from its installed metadata, less what the run path never imports:
# scipy is the vindex's eigensolver only (`mlx-k2 run` and `anchor` do not import it). nanobind is added: the
# kernels' CMake build runs it in the emulated interpreter (it is not imported at run time).
EXCLUDED = {"scipy"}
BUILD_ONLY = ["nanobind"]

RUNS = (("nokv", "3-step no-KV"), ("kv", "4-step KV"))
LAYER_FIELDS = ("norm_in", "norm_out", "experts", "weights_blake3")  # and what each layer read, by content


def mirror() -> int:
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
             *sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):  # deb822 stanzas
            for block in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in block.splitlines():
                    if line.startswith("#") or line[:1].isspace() or ":" not in line:
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.split()
                if ("deb" in fields.get("types", []) and SUITE in fields.get("suites", [])
                        and fields.get("enabled", ["yes"])[0].lower() != "no"):
                    for uri in fields.get("uris", []):
                        if uri.startswith(("http://", "https://")):
                            print(uri.rstrip("/"))
                            return 0
        else:  # one-line sources
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE and words[1].startswith(("http://", "https://")):
                    print(words[1].rstrip("/"))
                    return 0
    print("http://deb.debian.org/debian")
    return 0


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> int:
    import importlib.metadata as md

    from packaging.requirements import Requirement

    # The environment of the emulated interpreter: CPython 3.11 on aarch64 Linux.
    env = {"python_version": "3.11", "python_full_version": "3.11.2", "platform_system": "Linux",
           "sys_platform": "linux", "platform_machine": "aarch64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    roots = [Requirement(r) for r in md.distribution("mlx_k2").requires or []]
    stack = [r.name for r in roots if (r.marker is None or r.marker.evaluate(env)) and _key(r.name) not in EXCLUDED]
    stack += BUILD_ONLY
    seen: dict[str, str] = {}
    while stack:
        name = stack.pop()
        if _key(name) in seen:
            continue
        dist = md.distribution(name)
        seen[_key(name)] = f"{dist.metadata['Name']}=={dist.version}"
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate(env):
                stack.append(req.name)
    print("\n".join(seen[k] for k in sorted(seen)))
    return 0


# ---------------------------------------------------------------------------------------------- compare


def _ledger(path: Path) -> tuple[dict | None, dict[int, dict], dict | None, str]:
    """(header, steps by number, footer, problem)."""
    if not path.is_file():
        return None, {}, None, "no ledger"
    header, steps, footer = None, {}, None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            return header, steps, footer, "unreadable line"
        if rec.get("kind") == "header":
            header = rec
        elif rec.get("kind") == "step":
            steps[rec["step"]] = rec
        elif rec.get("kind") == "footer":
            footer = rec
    status = (footer or {}).get("status")
    return header, steps, footer, "" if status == "complete" else f"run {status or 'incomplete'}"


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def _ulps(x: float, y: float) -> int:
    """How many float64 values lie between x and y (0: equal)."""
    ix, iy = (struct.unpack("<q", struct.pack("<d", v))[0] for v in (x, y))
    ix, iy = (i if i >= 0 else -(i & 0x7FFFFFFFFFFFFFFF) for i in (ix, iy))  # monotonic across zero
    return abs(ix - iy)


def _compare_step(a: dict, b: dict) -> tuple[list[str], list[str], int, int, bool]:
    """(differing fields, detail phrases, equal layers, layers, whether only the norms differ, by <= 2 ulp)."""
    fields = [f for f in ("token_id", "hidden_digest", "logits_digest", "weights_blake3") if a.get(f) != b.get(f)]
    la = {l["layer"]: l for l in a.get("layers") or []}
    lb = {l["layer"]: l for l in b.get("layers") or []}
    layers = sorted(set(la) | set(lb))
    missing = [n for n in layers if n not in la or n not in lb]
    per_field: dict[str, list[int]] = {f: [] for f in LAYER_FIELDS}
    worst: dict[str, tuple[int, float]] = {}  # field -> (float64 ulps, relative difference), the largest
    for n in layers:
        if n in missing:
            continue
        for f in LAYER_FIELDS:
            x, y = la[n].get(f), lb[n].get(f)
            if x != y:
                per_field[f].append(n)
                if isinstance(x, float) and isinstance(y, float):
                    u, r = worst.get(f, (0, 0.0))
                    worst[f] = (max(u, _ulps(x, y)), max(r, abs(x - y) / max(abs(x), abs(y))))
    details = []
    for f, where in per_field.items():
        if not where:
            continue
        fields.append(f)
        if f in worst:
            u, r = worst[f]
            details.append(f"{f} at layers {_ranges(where)} (at most {u:,} ulp of float64, relative {r:.1e})")
        else:
            n = where[0]
            details.append(f"{f} at layers {_ranges(where)} (layer {n}: {la[n].get(f)} vs {lb[n].get(f)})")
    if missing:
        fields.append("layers")
        details.append(f"layers {_ranges(missing)} missing on one side")
    bad = set(missing).union(*per_field.values())
    # Only the float64 norms, by an ulp or two: a difference in how the norm is summed, not in the residual.
    norms_only = bool(fields) and set(fields) <= {"norm_in", "norm_out"} and max(u for u, _ in worst.values()) <= 2
    return fields, details, len(layers) - len(bad), len(layers), norms_only


def _anchor(results: Path, arch: str) -> tuple[str, str]:
    """(verdict, detail) from `mlx-k2 anchor`'s output: its verdict line "anchor: WORD ..." (reproduced: bit for
    bit; agrees: within a tolerance only; MISMATCH), "no anchor" where none matched, else "failed"."""
    log, rc = results / arch / "anchor.log", results / arch / "anchor.rc"
    if not log.is_file() or not rc.is_file():
        return "failed", "did not run"
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("anchor: ") and len(line.split()) > 1:
            tail = " ".join([line, *[l for l in lines[i + 1:] if l]])  # a verdict wrapped over lines
            verdict = line.split()[1]
            return verdict, tail.split(verdict, 1)[1].strip() + ("" if verdict == "reproduced" else f" (log {log})")
        if line.startswith("no anchor"):
            return "no anchor", f"{line} (log {log})"
    last = [l for l in lines if l]
    return "failed", f"exit {rc.read_text().strip()}: {last[-1] if last else 'no output'} (log {log})"


def compare(results: Path) -> int:
    archs = (("x86_64", "x86-64"), ("aarch64", "arm64"))
    failed: list[str] = []

    print("\nanchor (mlx-k2 anchor --device cpu --kernels own)")
    verdicts = {}
    for arch, label in archs:
        verdict, detail = _anchor(results, arch)
        verdicts[arch] = verdict
        print(f"  {label:7} {verdict:10} {detail}")
        if verdict in ("failed", "no anchor"):
            failed.append(f"{label} anchor")

    rows = []
    for run, title in RUNS:
        ledgers = {arch: _ledger(results / arch / f"{run}.jsonl") for arch, _ in archs}
        print(f"\n{run}: {title} run", end="")
        for arch, label in archs:
            header, _, _, problem = ledgers[arch]
            kernels = (header or {}).get("run", {}).get("kernels", "?")
            print(f"   {label} kernels {kernels}" + (f" [{problem}]" if problem else ""), end="")
            if problem:
                failed.append(f"{label} {run} ({problem}; log {results / arch / (run + '.log')})")
        print()
        (_, sx, _, _), (_, sa, _, _) = ledgers["x86_64"], ledgers["aarch64"]
        print(f"  {'step':>4} {'ctx':>3}  {'token x86-64':>12} {'token arm64':>12}  {'hidden':6} {'logits':6} "
              f"{'layers equal':>12}  result")
        for step in sorted(set(sx) | set(sa)):
            a, b = sx.get(step), sa.get(step)
            if a is None or b is None:
                print(f"  {step:>4} {'':>3}  {'-' if a is None else a['token_id']:>12} "
                      f"{'-' if b is None else b['token_id']:>12}  {'':6} {'':6} {'':>12}  MISSING on one side")
                rows.append((run, step, ["missing"], []))
                continue
            fields, details, same, total, norms_only = _compare_step(a, b)
            ok = not fields
            print(f"  {step:>4} {len(a.get('input_ids') or []):>3}  {a['token_id']:>12} {b['token_id']:>12}  "
                  f"{'=' if a.get('hidden_digest') == b.get('hidden_digest') else 'DIFF':6} "
                  f"{'=' if a.get('logits_digest') == b.get('logits_digest') else 'DIFF':6} "
                  f"{f'{same}/{total}':>12}  {'equal' if ok else 'DIFFERS (norms only, <= 2 ulp)' if norms_only else 'DIFFERS'}")
            if not ok:
                rows.append((run, step, fields, details))

    if rows:
        print("\ndifferences (x86-64 vs arm64):")
        for run, step, fields, details in rows:
            print(f"  {run} step {step}: {', '.join(fields)}")
            for d in details:
                print(f"      {d}")

    where: dict[str, dict[str, list[int]]] = {}  # field -> run -> steps
    for run, step, fields, _ in rows:
        for f in fields:
            where.setdefault(f, {}).setdefault(run, []).append(step)
    ordered = [f for f in ("missing", "token_id", "hidden_digest", "logits_digest", *LAYER_FIELDS, "layers")
               if f in where]
    spots = "; ".join(f"{f} at " + ", ".join(f"{run} steps {_ranges(v)}" for run, v in where[f].items())
                      for f in ordered)
    same = [f for f in ("token_id", "hidden_digest", "logits_digest", *LAYER_FIELDS) if f not in where]
    runs_failed = [f for f in failed if "anchor" not in f]
    if rows:
        steps = f"steps DIFFER: {spots}" + (f" ({', '.join(same)} equal at every step)" if same else "")
    elif runs_failed:
        steps = "the steps that ran are equal, but not every run completed"
    else:
        steps = "every step's digests equal"
    arm, x86 = verdicts["aarch64"], verdicts["x86_64"]
    if arm == "reproduced":
        anchor = "anchor reproduced on arm64"
    else:
        anchor = f"anchor NOT reproduced on arm64 ({arm}" + (f"; x86-64: {x86} too)" if x86 == arm else ")")
    print()
    if failed:
        print("could not check: " + "; ".join(failed))
    print(f"check-arm64: {anchor}; {steps}")
    if failed:
        return 2
    return 0 if arm == "reproduced" and not rows else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["mirror"]:
        return mirror()
    if argv[:1] == ["pins"]:
        return pins()
    if len(argv) == 2 and argv[0] == "compare":
        return compare(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
