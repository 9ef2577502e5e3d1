"""Probe fitting with BLAS held to one thread (what `probe_layers` and `probe_qtype` do) against the
library default (OpenBLAS picks one thread per core), side by side in one run.

`cliviz probe-layers` fits thousands of small logistic regressions (a few hundred rows, 64 to a few
thousand features). Each L-BFGS step calls BLAS on tiny vectors: extra threads cannot help, and
OpenBLAS's waiting threads spin, so with another process on a core each fit slows many times over.
Run it once on an idle machine and once beside a busy process (e.g. a training run) to see both:

    python benchmarks/bench_probes.py [--repeats 7] [--fits 20]

Prints, per variant, the median seconds per fit of a 400 x 64, 4-class probe (the size of a tiny
model's patch probe) and of a 400 x 1,024 one (a 7B tower's width), and the ratio default / one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402


def seconds_per_fit(X: np.ndarray, y: np.ndarray, fits: int, one_thread: bool) -> float:
    """Mean seconds of one `StandardScaler + LogisticRegression` fit, as `_fold_counts` makes it."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    limit = threadpool_limits(limits=1, user_api="blas") if one_thread else None
    try:
        t0 = time.perf_counter()
        for _ in range(fits):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y)
        return (time.perf_counter() - t0) / fits
    finally:
        if limit is not None:
            limit.restore_original_limits()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fits", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    for width in (64, 1024):
        X, y = rng.normal(size=(400, width)), rng.integers(0, 4, 400)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):  # interleaved, so both variants see the same machine
            for one_thread in (False, True):
                times[one_thread].append(seconds_per_fit(X, y, args.fits, one_thread))
        default, single = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"400 x {width:>4}: default BLAS threads {default * 1e3:7.2f} ms/fit, one thread "
            f"{single * 1e3:7.2f} ms/fit, ratio {default / single:5.2f}x"
        )


if __name__ == "__main__":
    main()
