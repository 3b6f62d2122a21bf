"""Benchmarks of cdm_kernels against its peers and against its speed targets.

    python -m benchmarks.bench_stf --quick        the stable-target sweep against the peers (CSV, markdown, plots)
    python -m benchmarks.stf_cpu_targets          the fused CPU kernel's speed targets, pass/fail
    python -m benchmarks.bench_rollout            the fused rollout steps' speed targets, pass/fail
    python benchmarks/stf_precision_table.py      each precision mode's error against float64
    python -m benchmarks.bench_train_step         one training step of each loss, against the authors' formulas
    python -m benchmarks.gpu_targets              every GPU target in one run, pass/fail
    python -m benchmarks.estimators               STF's bias and variance, CDM's martingale term, against the exact denoiser
    python -m benchmarks.objectives               EDM, STF, CDM and STF+CDM trained on the digits, against the exact denoiser

Each also runs as `python benchmarks/<name>.py`, and each has --quick and --out (--quick checks the
script in seconds to a minute; objectives' --quick is the small comparison itself, a few minutes).
By default they write into out/benchmarks/<name> (ignored by git); the committed results in
benchmarks/results/ change only when --out names that folder.

Shared machinery (methods, float64 judge, timers, memory, machine ceilings): `stf_common`.
"""
