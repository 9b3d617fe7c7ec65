"""When two computations must give the same bits: the exactness rule that anchors, replay and verify share.

A platform is a dict with a header's run fields `backend`, `device`, `compute_dtype`, `kernels` and (from schema
3) `machine`, `system` and `exactness`. A `portable` computation (every operation the product's own, in a
fixed order) gives the same bits on any machine with the same backend, device, dtype and kernels version; a
`platform` one (MLX's built-ins, the GPU) only on the same machine and OS as well. Where that does not hold,
values agree within CROSS_PLATFORM_RTOL (ids, tokens, experts and bytes still exactly) and digests, which hash
the floats, are not compared. A record from before the machine was recorded is taken at its word: the same
bits wherever backend, device, dtype and kernels are equal, and the rule says the machine was not recorded.
"""

from __future__ import annotations

from typing import Any

from .schema import BUILTIN_KERNELS, PORTABLE

CROSS_PLATFORM_RTOL = 1e-4
PLATFORM = ("backend", "device", "compute_dtype", "kernels", "machine", "system", "exactness")


def kernel_key(kernels: str) -> str:
    """`mlx_k2-cpu/2:avx2` -> `mlx_k2-cpu/2`: the SIMD paths of one kernel version agree bit for bit."""
    return kernels.split(":")[0]


def computation(platform: dict[str, Any]) -> tuple:
    """(backend, device, dtype, kernels version): what decides the arithmetic (a header from before run.kernels
    ran MLX's built-ins)."""
    return (platform.get("backend"), platform.get("device"), platform.get("compute_dtype"),
            kernel_key(str(platform.get("kernels", BUILTIN_KERNELS))))


def place(platform: dict[str, Any]) -> str:
    return f"{platform.get('machine')} {platform.get('system')}"


def describe(platform: dict[str, Any]) -> str:
    """`mlx cpu float32 mlx_k2-cpu/4 on x86_64 Linux` (without `on ...` where the machine is not recorded)."""
    where = f" on {place(platform)}" if "machine" in platform else ""
    return " ".join(map(str, computation(platform))) + where


def same_bits(recorded: dict[str, Any], ran: dict[str, Any]) -> tuple[bool, str]:
    """(whether a computation on `ran` must give the bits one on `recorded` gave, the rule that says so)."""
    if computation(recorded) != computation(ran):
        return False, ""
    if recorded.get("exactness") == PORTABLE and ran.get("exactness") == PORTABLE:
        return True, "portable: the same bits on any CPU"
    if "machine" not in recorded:
        return True, "same backend, device, dtype and kernels; the machine was not recorded"
    if place(recorded) == place(ran):
        return True, f"platform: same {place(ran)}"
    return False, ""


def within_tolerance(a: float, b: float) -> bool:
    """Two floats of computations that need not give the same bits agree: relative to the larger magnitude
    (and at least 1)."""
    return abs(a - b) <= CROSS_PLATFORM_RTOL * max(abs(a), abs(b), 1.0)
