"""Benchmark `cliviz figures`: export through one reused kaleido session vs one-shot exports,
and the computation of the figure set (read + statistics + plotly figures, no export).

    python benchmarks/bench_figures.py [--n-traces 2000] [--rounds 3] [--format pdf] [--json OUT]

Export: the standard figure set is built once from the synthetic trace set, then each round
exports every figure (a) through one persistent session (`kaleido.start_sync_server(mathjax=False)`,
the way `cliviz figures` does it; the browser start is timed separately as `session start`) and
(b) with a plain one-shot `fig.write_image(...)` per figure (plotly's default: a fresh Chromium per
call). The two variants alternate order from round to round (ABBA); we report per-figure medians
and the one-shot / session ratio. Absolute times depend heavily on machine load: compare ratios.

Computation: median over rounds of `TraceSet.read` and of `build_figure_set` on a synthetic set
of `--n-traces` traces (4 LLM x 6 vision layers, 40 tokens, 3 answer steps, 5 question types).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from cliviz.analyses.figures import build_figure_set, find_chromium, kaleido_session  # noqa: E402
from cliviz.tracing.schema import Trace, TraceMeta  # noqa: E402
from cliviz.tracing.traceset import TraceSet, write_traces  # noqa: E402

QTYPES = ("colour", "shape", "count", "position", "glyph")


def synthetic_set(n: int, *, L: int = 4, K: int = 6, T: int = 40, n_answer: int = 3, seed: int = 0) -> list[Trace]:
    """Gates with a preferred vision layer per (question type, LLM layer) plus noise."""
    rng = np.random.default_rng(seed)
    vision, llm = list(range(2, 2 + 2 * K, 2)), list(range(1, 1 + 2 * L, 2))
    logits = rng.normal(0, 1.0, size=(n, L, T, K))
    q = np.arange(n) % len(QTYPES)
    for layer in range(L):
        logits[np.arange(n), layer, :, (q + layer) % K] += 2.0
    gates = np.exp(logits)
    gates /= gates.sum(-1, keepdims=True)
    gates = gates.astype(np.float32)
    norms = rng.gamma(2.0, 0.5, size=(n, L, T)).astype(np.float32)
    roles = ["prompt"] + ["image"] * (T // 2) + ["prompt"] * (T - T // 2 - n_answer) + ["answer"] * (n_answer - 1)
    out = []
    for i in range(n):
        meta = TraceMeta(
            question=f"question {i}",
            answer="red",
            model="synthetic",
            config_hash="0",
            fusion="cli",
            vision_layers=vision,
            injection_layers=llm,
            image_sha256="0" * 64,
            image_width=64,
            image_height=64,
            device="cpu",
            dtype="float32",
            created_at="2025-01-01T00:00:00+00:00",
            cliviz_version="0.1.0",
            qtype=QTYPES[q[i]],
            reference_answer="red",
            sample_id=f"s{i}",
        )
        out.append(
            Trace(
                meta=meta,
                token_ids=np.arange(T, dtype=np.int64),
                token_texts=[f"t{j}" for j in range(T)],
                token_roles=roles,
                gates=gates[i],
                injection_norm=norms[i],
                answer_ids=np.arange(n_answer, dtype=np.int64),
                answer_texts=["red"] + ["<eos>"] * (n_answer - 1),
                answer_positions=np.arange(T - n_answer, T, dtype=np.int64),
                answer_logprobs=np.zeros(n_answer, np.float32),
                topk_ids=np.zeros((n_answer, 1), np.int64),
                topk_texts=[["x"]] * n_answer,
                topk_logprobs=np.zeros((n_answer, 1), np.float32),
            )
        )
    return out


def bench_compute(path: Path, rounds: int) -> dict[str, float]:
    reads, builds = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ts = TraceSet.read(path)
        t1 = time.perf_counter()
        build_figure_set(ts)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        builds.append(t2 - t1)
    return {"read_s": statistics.median(reads), "compute_s": statistics.median(builds)}


def bench_export(items, fmt: str, rounds: int, out: Path) -> dict:
    import kaleido

    session: dict[str, list[float]] = {it.name: [] for it in items}
    oneshot: dict[str, list[float]] = {it.name: [] for it in items}
    starts: list[float] = []
    session_totals: list[float] = []
    oneshot_totals: list[float] = []

    def run_session() -> None:
        t0 = time.perf_counter()
        with kaleido_session() as s:
            s.render(items[0].fig, "svg", 50, 50)  # browser launch + page load, timed as the start cost
            starts.append(time.perf_counter() - t0)
            for it in items:
                t = time.perf_counter()
                (out / f"session_{it.name}.{fmt}").write_bytes(s.render(it.fig, fmt, it.width, it.height))
                session[it.name].append(time.perf_counter() - t)
        session_totals.append(time.perf_counter() - t0)

    def run_oneshot() -> None:
        assert not kaleido._global_server.is_running()
        t0 = time.perf_counter()
        for it in items:
            t = time.perf_counter()
            it.fig.write_image(str(out / f"oneshot_{it.name}.{fmt}"), format=fmt, width=it.width, height=it.height)
            oneshot[it.name].append(time.perf_counter() - t)
        oneshot_totals.append(time.perf_counter() - t0)

    for r in range(rounds):
        order = (run_session, run_oneshot) if r % 2 == 0 else (run_oneshot, run_session)
        for fn in order:
            fn()
    per_figure = []
    for it in items:
        s_med, o_med = statistics.median(session[it.name]), statistics.median(oneshot[it.name])
        per_figure.append({"figure": it.name, "session_s": s_med, "oneshot_s": o_med, "ratio": o_med / s_med})
    return {
        "format": fmt,
        "rounds": rounds,
        "per_figure": per_figure,
        "session_start_s": statistics.median(starts),
        "session_total_s": statistics.median(session_totals),
        "oneshot_total_s": statistics.median(oneshot_totals),
        "total_ratio": statistics.median(oneshot_totals) / statistics.median(session_totals),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-traces", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--format", default="pdf", choices=["pdf", "svg", "png"])
    ap.add_argument("--skip-export", action="store_true", help="only time the computation")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    results: dict = {"n_traces": args.n_traces, "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.perf_counter()
        path = write_traces(d / "traces.parquet", synthetic_set(args.n_traces))
        print(
            f"synthetic set: {args.n_traces} traces, {path.stat().st_size / 1e6:.1f} MB "
            f"(made in {time.perf_counter() - t0:.1f} s)"
        )
        results["compute"] = bench_compute(path, args.rounds)
        c = results["compute"]
        print(
            f"computation (no export), median of {args.rounds}: read {c['read_s']:.2f} s, "
            f"build figure set {c['compute_s']:.2f} s"
        )
        if not args.skip_export:
            print(f"browser: {find_chromium()}")
            items, _ = build_figure_set(TraceSet.read(path))
            results["export"] = e = bench_export(items, args.format, args.rounds, d)
            print(f"\nexport ({args.format}), median of {args.rounds} interleaved rounds:")
            print(f"{'figure':<18}{'session s':>11}{'one-shot s':>12}{'ratio':>8}")
            for row in e["per_figure"]:
                print(f"{row['figure']:<18}{row['session_s']:>11.3f}{row['oneshot_s']:>12.3f}{row['ratio']:>8.1f}")
            print(
                f"whole set: session {e['session_total_s']:.2f} s (browser start {e['session_start_s']:.2f} s) vs "
                f"one-shot {e['oneshot_total_s']:.2f} s -> {e['total_ratio']:.1f}x"
            )
    results["load_avg_end"] = os.getloadavg()
    print(
        f"load average at start {results['load_avg'][0]:.2f}, at end {results['load_avg_end'][0]:.2f} "
        "(2-core machine: absolute times are inflated under load, ratios are the result)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
