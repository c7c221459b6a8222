"""One line that says which machine a figure came from.

The same seed can train differently on two CPUs: BLAS picks its kernels (and so its summation
order) by the CPU's instruction set and vendor (MKL takes other paths on AMD than on Intel), and
an optimisation that sits on a knife's edge amplifies the last-bit differences (bench/README.md,
"Layer-wise stability"). The demo and the benches print this line beside their figures.
"""

from __future__ import annotations

import os
import platform
import re


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set flags that change which kernels BLAS and torch pick."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def machine_summary() -> str:
    """e.g. 'Intel(R) Xeon(R) Processor @ 2.80GHz (2 cores; avx2 avx512f), torch 2.13.0+cpu, BLAS mkl,
    torch CPU kernels AVX512, 2 threads'."""
    import torch

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    cuda = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()} ({os.cpu_count()} cores; {' '.join(cpu_flags()) or 'no AVX flags read'}), "
            f"torch {torch.__version__}, BLAS {blas.group(1) if blas else 'unknown'}, "
            f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads{cuda}")
