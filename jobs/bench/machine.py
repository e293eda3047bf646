"""What the bench runs on: CPU model and its bf16 support (from lscpu), memory, GPU, versions, load average."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# x86 flags that decide whether bf16 matmuls are fast on a CPU; aarch64 says "bf16" in its Features line.
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")


def cpu_info() -> dict[str, Any]:
    """lscpu's model name and the bf16-relevant flags, and whether bf16 is expected to beat fp32 on this CPU."""
    model, flags = "", set()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})
        for line in out.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and not model:
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    if not model or not flags:  # no lscpu: /proc/cpuinfo has the same fields
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    has = {f: f in flags for f in BF16_FLAGS}
    if has["amx_bf16"]:
        fast, why = True, "AMX-BF16: bf16 matmuls run on AMX tiles, several times faster than fp32"
    elif has["avx512_bf16"]:
        fast, why = True, "AVX512-BF16: native bf16 dot products, faster than fp32"
    elif "bf16" in flags:
        fast, why = True, "ARM BF16 instructions: bf16 matmuls faster than fp32"
    else:
        fast, why = False, "no AMX-BF16 or AVX512-BF16: bf16 matmuls are emulated, slower than fp32"
    return {"model": model or platform.processor() or platform.machine(), "bf16_flags": has, "bf16_fast": fast,
            "bf16_note": why}


def machine() -> dict[str, Any]:
    import ray
    import torch

    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = cpu_info()
    with contextlib.suppress(Exception):
        cpu["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return {"cpu": cpu["model"], "cpu_info": cpu, "cpus": os.cpu_count(), "memory_gb": mem_gb, "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "transformers": _version("transformers"), "platform": platform.platform()}


def _version(package: str) -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(package)
    return None


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None
