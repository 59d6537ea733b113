"""What machine a benchmark ran on, recorded in every benchmark's JSON, and the timing and
saving helpers the benchmarks share.

Timings only compare within one machine: the CPU's model and vector extensions (AVX-512,
bfloat16 / AMX, which `precision: auto` uses) change them by 2x or more.
"""
import os
import statistics
import time
from pathlib import Path

from keras_glas.atomic import write_json

# Extensions that change TensorFlow's CPU speed, as /proc/cpuinfo names them.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def machine_info(cpuinfo=Path("/proc/cpuinfo")):
    """`{"cpu_count", "cpu_model", "cpu_flags"}`: logical cores, the CPU's model name and which
    of VECTOR_FLAGS it has (model None and flags [] where /proc/cpuinfo does not exist)."""
    model, flags = None, set()
    if Path(cpuinfo).is_file():
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"cpu_count": os.cpu_count(), "cpu_model": model,
            "cpu_flags": [flag for flag in VECTOR_FLAGS if flag in flags]}


def save_results(path, results: dict) -> None:
    """`write_json(path, results)` when a path is given, and says where."""
    if path:
        write_json(path, results)
        print(f"written to {path}")


def interleaved_median_seconds(functions, runs):
    """Median wall time of each of `functions` over `runs` calls, after one warm-up call each.

    The calls alternate (a, b, a, b, ...) so that a load change on a shared CPU hits both alike
    and their ratio stays meaningful.
    """
    for function in functions:
        function()
    times = [[] for _ in functions]
    for _ in range(runs):
        for function, samples in zip(functions, times, strict=True):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]
