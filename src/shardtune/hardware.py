"""What this machine computes fast: native bf16, the mixed precision `auto` resolves to, and measured matmul peaks.

bf16 pays only where the hardware multiplies in it. On a CPU without
AVX512-BF16 or AMX, PyTorch's bf16 matmuls are emulated: on the 2-core AMD
EPYC (Zen 3, AVX2) build machine a bf16 F.linear runs at about 6 GFLOP/s on one
thread against about 50-75 in fp32. `train.mixed_precision: auto` therefore
picks bf16 only where `native_bf16` says so.

`matmul_peak_flops` measures the dense matmul FLOP/s the process reaches (at
its thread count) with a short timed loop of square matmuls, for a CPU
roofline and for `train/mfu` on CPUs, which have no datasheet entry in
`shardtune.flops.PEAK_FLOPS_16BIT`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from shardtune import ShardtuneError
from shardtune.flops import peak_flops

Device = Union[str, torch.device]
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo "flags"; aarch64 lists "bf16" under "Features"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: Optional[str] = None) -> Optional[set[str]]:
    """The first processor's feature flags from /proc/cpuinfo text (x86 `flags`, aarch64 `Features`); None without one."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_bf16_features(flags: Optional[set[str]]) -> list[str]:
    """The native bf16 features in a flag set: avx512_bf16 / amx_bf16 (x86) or bf16 (aarch64)."""
    return sorted(f for f in flags if f in CPU_BF16_FLAGS or f == "bf16")


def _torch_cpu_bf16() -> list[str]:
    """The same question asked through PyTorch's cpuinfo (where /proc/cpuinfo is missing, e.g. macOS)."""
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return [name for name, fn in checks.items() if getattr(torch.cpu, fn, lambda: False)()]


def native_bf16(device: Device, cpuinfo: Optional[str] = None) -> tuple[bool, str]:
    """(whether `device` computes bf16 matmuls natively, why), the reason one sentence fragment for the run log."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        if torch.version.hip:
            return True, f"{torch.cuda.get_device_name(device)} (ROCm) computes bf16 natively"
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return True, f"{name} computes bf16 natively (compute capability {major}.{minor})"
        return False, f"{name} has no native bf16 (compute capability {major}.{minor}, bf16 needs 8.0 or newer)"
    if device.type == "cpu":
        flags = cpu_flags(cpuinfo)
        found = cpu_bf16_features(flags) if flags is not None else _torch_cpu_bf16()
        if found:
            return True, f"this CPU has {' and '.join(found)}"
        return False, (
            f"this CPU has neither avx512_bf16 nor amx_bf16 (PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            "so bf16 matmuls would be emulated, far slower than fp32"
        )
    return False, f"native bf16 is not detected on {device.type} devices"


AUTO_ENV = "SHARDTUNE_AUTO_PRECISION"  # no | bf16: what auto resolves to, the same on every machine (the test suite sets no)
BF16_WIN = 1.2  # on CPU, auto takes bf16 only when its measured matmul peak is at least this many times fp32's


def resolve_mixed_precision(requested: str, device: Device, cpuinfo: Optional[str] = None,
                            peak: Optional[Callable[[torch.dtype], float]] = None) -> tuple[str, str]:
    """train.mixed_precision -> (the choice: "no" | "bf16" | "fp16", why). auto is bf16 where native, else no;
    an explicit value passes through (with a note when bf16 is not native there).

    On a CPU the flag says bf16 instructions exist, not that bf16 pays: how much faster oneDNN's bf16 kernels are
    than fp32 depends on the part (AVX512-BF16 alone gains far less than AMX) and a VM may expose a flag the host
    does not honour. So auto also compares the measured matmul peaks (`peak`, default `cpu_peak_cached`, measured
    once per machine; on this project's Xeon VM 135 vs 104 GFLOP/s, so bf16) and keeps fp32 unless bf16 is at
    least BF16_WIN times faster: below that, bf16's rounding is not worth its speed."""
    if requested not in MIXED_PRECISION:
        raise ShardtuneError(f"train.mixed_precision={requested!r} is not one of {', '.join(MIXED_PRECISION)}; pick one of those.")
    if requested == "auto" and os.environ.get(AUTO_ENV):
        pinned = os.environ[AUTO_ENV]
        if pinned not in ("no", "bf16"):
            raise ShardtuneError(f"{AUTO_ENV}={pinned!r} must be no or bf16 (what train.mixed_precision: auto resolves to); unset it to detect.")
        return pinned, f"auto chose {pinned}: {AUTO_ENV}={pinned}"
    if requested == "auto":
        ok, why = native_bf16(device, cpuinfo)
        if ok and torch.device(device).type == "cpu":
            peak = peak or cpu_peak_cached
            bf16, fp32 = peak(torch.bfloat16), peak(torch.float32)
            speeds = f"measured bf16 matmul peak {bf16 / 1e9:.0f} GFLOP/s vs fp32 {fp32 / 1e9:.0f} GFLOP/s"
            if bf16 < BF16_WIN * fp32:
                return "no", f"auto chose no (fp32): {why}, but its {speeds} (bf16 needs {BF16_WIN}x to be chosen)"
            why = f"{why} ({speeds})"
        return ("bf16", f"auto chose bf16: {why}") if ok else ("no", f"auto chose no (fp32): {why}")
    if requested == "bf16":
        ok, why = native_bf16(device, cpuinfo)
        if not ok:
            return "bf16", f"bf16 as configured, although {why}"
    return requested, f"{requested} as configured"


# ---------------------------------------------------------------- measured peaks

_PEAKS: dict[tuple[str, str, int], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    """One a @ b.T through F.linear, the op models run: on CPUs without native bf16, torch.mm in bf16 takes a
    naive path about 6x slower than F.linear's oneDNN kernel (0.9 vs 5.7 GFLOP/s measured on the AVX2 EPYC)."""
    _sync(a.device)
    start = time.perf_counter()
    F.linear(a, b)
    _sync(a.device)
    return time.perf_counter() - start


def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: Device = "cpu", budget_s: float = 2.0,
                      max_size: Optional[int] = None, refresh: bool = False) -> float:
    """The best dense matmul FLOP/s (2 n^3 per n x n product, through F.linear) this process reaches in `dtype` on `device`,
    at its current thread count; cached per process.

    Sizes double from 256 while one product takes under budget_s / 8 (up to max_size: 4096 on CPU, 8192 on
    GPU), then the largest is repeated until the budget is spent, so an emulated dtype costs no more time
    than a fast one: about budget_s, at most twice that.
    """
    device = torch.device(device)
    key = (str(dtype), str(device), torch.get_num_threads())
    if key in _PEAKS and not refresh:
        return _PEAKS[key]
    max_size = max_size or (8192 if device.type == "cuda" else 4096)
    deadline = time.perf_counter() + budget_s
    best, n = 0.0, 256
    rng = torch.Generator(device).manual_seed(0)  # its own: the run's seeded RNG stream must not depend on a cache file
    while True:
        a, b = (torch.randn(n, n, device=device, generator=rng).to(dtype) for _ in range(2))
        _matmul_seconds(a, b)  # warm-up: first-call dispatch, allocation, library init
        seconds = _matmul_seconds(a, b)
        best = max(best, 2 * n**3 / seconds)
        if seconds > budget_s / 8 or 2 * n > max_size or time.perf_counter() > deadline:
            break
        n *= 2
    while time.perf_counter() < deadline:
        best = max(best, 2 * n**3 / _matmul_seconds(a, b))
    _PEAKS[key] = best
    return best


def mfu_peak(device: Device, mixed_precision: str, measure: bool = True, remeasure: bool = False) -> tuple[Optional[float], str]:
    """(peak FLOP/s to divide train/mfu by, where it comes from). GPUs: the datasheet table (`shardtune.flops`);
    CPUs: this process's measured matmul peak in the step's dtype (bf16 under bf16 autocast, else fp32);
    `remeasure` measures that once more (`cpu_peak_cached`)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_flops(name, mixed_precision)
        return peak, (f"datasheet dense {mixed_precision} peak of {name}" if peak else f"{name} in {mixed_precision} has no peak table entry")
    if device.type != "cpu" or not measure:
        return None, f"no peak for {device.type}" if measure else "peak measurement off"
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return cpu_peak_cached(dtype, remeasure), f"measured {name} matmul peak of this CPU at {torch.get_num_threads()} thread(s)"


def cpu_peak_cached(dtype: torch.dtype, remeasure: bool = False) -> float:
    """matmul_peak_flops on this CPU, measured once per machine, thread count and torch version and kept in
    `$SHARDTUNE_CACHE/cpu-peaks.json`: every run would otherwise spend about 2 s measuring it again.
    `remeasure` measures again and keeps the larger of the two: a peak measured while other jobs shared the
    cores reads low (half the real one, seen here), and would otherwise stay in the file for every later run."""
    import json
    import platform

    from shardtune.assets import cache_dir

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")), platform.machine())
    key = f"{model}|{os.cpu_count()} cpus|{torch.get_num_threads()} threads|{dtype}|torch {torch.__version__}"
    path = cache_dir() / "cpu-peaks.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known or remeasure:
        known[key] = max(matmul_peak_flops(dtype, "cpu", refresh=remeasure), float(known.get(key, 0.0)))
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    return float(known[key])
