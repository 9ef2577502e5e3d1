"""Trace sets at research scale: LLaVA-1.5-7B-shaped traces (31 x ~640 x 25 float32 gates, ~1.9 MB
each), built through the public API (`cliviz.tracing.synthetic.real_shape_trace`).

Measured, side by side in one run (ratios are what count on a loaded machine):

1. **Appends**: one writer process appends 64 traces at a time up to the largest count. Time of
   each append (generation excluded) and the writer's peak RSS at each checkpoint count. Targets:
   median of the last 4 appends / median of the first 4 <= 1.5; peak flat (< 1.5 GB).
2. **Bytes per trace**: 64 traces written lossless, float16 gates, answer-only positions, both.
3. **`cliviz figures`** (a subprocess, PNG only): wall time and peak RSS of the command's process
   (Chromium not counted) on the first `--small` traces vs the whole set. Target: memory ratio <= 1.3.

    python benchmarks/bench_traceset_scale.py                      # 256 / 1,024 / 1,536 traces
    python benchmarks/bench_traceset_scale.py --counts 256,1024,4096 --small 256
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

PER_APPEND = 64
REPO = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def writer(out: Path, total: int, checkpoints: list[int]) -> None:
    """Child process: append `total` traces, 64 at a time; one JSON line per append."""
    from cliviz.tracing.synthetic import real_shape_trace
    from cliviz.tracing.traceset import TraceSet

    for start in range(0, total, PER_APPEND):
        traces = [real_shape_trace("llava-1.5-7b", seed=i, sample_id=f"s{i}") for i in range(start, start + PER_APPEND)]
        t0 = time.perf_counter()
        TraceSet.append(out, traces)
        dt = time.perf_counter() - t0
        del traces
        n = start + PER_APPEND
        print(json.dumps({"n": n, "seconds": dt, "peak_mb": _peak_mb(), "checkpoint": n in checkpoints}), flush=True)


def bytes_per_trace(folder: Path) -> dict[str, float]:
    from cliviz.tracing.compact import Compact
    from cliviz.tracing.synthetic import real_shape_trace
    from cliviz.tracing.traceset import TraceSet

    traces = [real_shape_trace("llava-1.5-7b", seed=i, sample_id=f"s{i}") for i in range(PER_APPEND)]
    out = {}
    for label, compact in (
        ("lossless", Compact()),
        ("float16 gates", Compact("float16", "all")),
        ("answer positions", Compact("float32", "answer")),
        ("float16 + answer", Compact("float16", "answer")),
    ):
        path = folder / f"bytes-{label.replace(' ', '-')}"
        TraceSet.append(path, traces, compact=compact)
        size = sum(p.stat().st_size for p in path.glob("*.parquet"))
        out[label] = size / len(traces)
    return out


def run_figures(trace_set: Path, out: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB of the cliviz process, exit code) of `cliviz figures -f png`."""
    cmd = [sys.executable, "-m", "cliviz", "figures", str(trace_set), "--out", str(out), "-f", "png"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return wall, peak, proc.returncode


def small_copy(full: Path, n: int, dest: Path) -> Path:
    """The first `n` traces of a set folder, as their own set (the same part files, copied)."""
    dest.mkdir(parents=True)
    shutil.copy(full / "_cliviz.json", dest / "_cliviz.json")
    for p in sorted(full.glob("part-*.parquet"))[: n // PER_APPEND]:
        shutil.copy(p, dest / p.name)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="256,1024,1536", help="checkpoint trace counts; the last is the set size")
    ap.add_argument("--small", type=int, default=256, help="traces in the small set of the figures comparison")
    ap.add_argument("--folder", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--writer", nargs=2, metavar=("OUT", "TOTAL"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoints", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.writer:
        writer(Path(args.writer[0]), int(args.writer[1]), [int(c) for c in args.checkpoints.split(",") if c])
        return
    counts = [int(c) for c in args.counts.split(",")]
    total = counts[-1]
    work = Path(args.folder or tempfile.mkdtemp(prefix="bench-traceset-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        full = work / "set.parquet"
        print(f"appending {total} LLaVA-1.5-7B-shaped traces, {PER_APPEND} per append ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--writer", str(full), str(total), "--checkpoints", ",".join(map(str, counts))],
            capture_output=True,
            text=True,
            check=True,
        )
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        times = [r["seconds"] for r in rows]
        first, last = statistics.median(times[:4]), statistics.median(times[-4:])
        print("\n## Appends (64 traces each, one writer process)")
        print("| traces in set | append s (median of 4 around) | writer peak RSS MB |")
        print("|---:|---:|---:|")
        for r_i, r in enumerate(rows):
            if r["checkpoint"]:
                near = times[max(0, r_i - 3) : r_i + 1]
                print(f"| {r['n']} | {statistics.median(near):.2f} | {r['peak_mb']:.0f} |")
        peaks = {r["n"]: r["peak_mb"] for r in rows if r["checkpoint"]}
        print(
            f"\nlast/first append time: {last / first:.2f}x (target <= 1.5x); "
            f"peak at {counts[-1]} / at {counts[0]}: {peaks[counts[-1]] / peaks[counts[0]]:.2f}x"
        )
        size = sum(p.stat().st_size for p in full.glob("*.parquet"))
        print(f"set on disk: {size / 2**30:.2f} GiB in {len(list(full.glob('*.parquet')))} parts")

        print("\n## Bytes per 7B trace")
        print("| stored as | MB per trace |")
        print("|---|---:|")
        for label, b in bytes_per_trace(work).items():
            print(f"| {label} | {b / 1e6:.3f} |")

        small = small_copy(full, args.small, work / "small.parquet")
        print(f"\n## cliviz figures -f png ({args.small} vs {total} traces)")
        ws, ps, cs = run_figures(small, work / "figs-small")
        wl, pl, cl = run_figures(full, work / "figs-large")
        print("| traces | wall s | peak RSS MB (cliviz process) | exit |")
        print("|---:|---:|---:|---:|")
        print(f"| {args.small} | {ws:.1f} | {ps:.0f} | {cs} |")
        print(f"| {total} | {wl:.1f} | {pl:.0f} | {cl} |")
        print(
            f"\nmemory ratio {pl / ps:.2f}x (target <= 1.3x); time ratio {wl / ws:.2f}x "
            f"for {total / args.small:.1f}x the traces"
        )
    finally:
        if args.folder is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
