"""Benchmarks of cdm_kernels against its peers (issue 6) and the CPU kernel's speed targets (issue 2).

    python -m benchmarks.bench_stf --quick        the stable-target sweep (CSV, markdown, plots)
    python -m benchmarks.stf_cpu_targets          issue 2's pass/fail table for the fused CPU kernel

Shared machinery (methods, float64 judge, timers, memory, machine ceilings): `stf_common`.
"""
