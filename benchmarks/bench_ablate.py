"""Knockout grid: the batched engine (`knockout_grid`) versus the naive loop (`naive_knockout_grid`).

Both compute the same full grid — every injection layer x every vision layer knockout plus the
unablated reference — on the bundled model (`load_model()`; the same architecture with random
weights when assets/models/cli-tiny is absent) for `--samples` ShapesVQA samples:
  batched  the engine as shipped: samples x conditions stacked along the batch dimension, one nnsight
           forward per chunk of at most --max-batch rows, per-row gate rewrites in one vectorised
           expression, and prefix sharing (what precedes the knocked-out layer is taken from the
           reference run through nnsight `skip`)
  stacked  the same without prefix sharing (`share_prefix=False`): every row runs the whole model
  naive    a Python loop of one unpadded nnsight forward per (cell, sample), knockout written by hand

Variants are interleaved (A B A B ...) after a warm-up; medians and their ratio are reported (never
one-off times), plus the largest absolute difference between the two frames' numbers.
Target: naive / batched >= 10x. `--no-stacked` leaves the middle variant out.

    python benchmarks/bench_ablate.py --samples 64 --repeats 3
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch: idle OpenMP threads must not spin on a shared box
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from common import bundled_model  # noqa: E402  (same folder)

TARGET = 10.0


def max_abs_diff(a, b) -> float:
    keys = ["condition", "qtype", "metric"]
    joined = a.merge(b, on=keys, suffixes=("_a", "_b"), how="outer", indicator=True)
    if (joined["_merge"] != "both").any():
        return float("inf")
    diff = 0.0
    for col in ("value", "ci_low", "ci_high"):
        diff = max(diff, float((joined[f"{col}_a"] - joined[f"{col}_b"]).abs().max()))
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=11, help="ShapesVQA stream seed")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--tokens", default="all", help="all | prompt | image | answer")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-stacked", action="store_true", help="skip the batched-without-prefix-sharing variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the naive loop is a test oracle
    from cliviz.analyses.ablations import knockout_grid
    from cliviz.data import iter_samples

    from oracles import naive_knockout_grid

    model, tok, label = bundled_model(args.device)
    samples = list(iter_samples(args.samples, seed=args.seed))
    data = ([s.image for s in samples], [s.question for s in samples], [s.answer for s in samples])
    qtypes = [s.qtype for s in samples]
    n_cells = len(model.config.injection_layers) * len(model.config.vision_layers)
    print(
        f"{label}: {len(model.config.injection_layers)} injection layers x {len(model.config.vision_layers)} vision "
        f"layers = {n_cells} cells + reference, {args.samples} samples -> {(n_cells + 1) * args.samples} "
        f"(sample, condition) rows; max_batch {args.max_batch}, tokens={args.tokens}, "
        f"{torch.get_num_threads()} threads, device {args.device}",
        flush=True,
    )

    variants = {
        "batched": lambda: knockout_grid(
            model, tok, *data, qtypes=qtypes, max_batch=args.max_batch, tokens=args.tokens
        ),
        "stacked": lambda: knockout_grid(
            model, tok, *data, qtypes=qtypes, max_batch=args.max_batch, tokens=args.tokens, share_prefix=False
        ),
        "naive": lambda: naive_knockout_grid(model, tok, *data, qtypes=qtypes, tokens=args.tokens),
    }
    if args.no_stacked:
        del variants["stacked"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    frames = {}
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            frames[name] = fn()
            elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(elapsed)
            print(f"  round {i} {'(warm-up)' if i < args.warmup else ''} {name}: {elapsed:.2f} s", flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["naive"] / med["batched"]
    print(f"\nmedians over {args.repeats} interleaved rounds: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    print(f"naive / batched = {ratio:.2f}x (target >= {TARGET:.0f}x: {'ok' if ratio >= TARGET else 'below'})")
    if "stacked" in med:
        print(
            f"naive / stacked = {med['naive'] / med['stacked']:.2f}x; stacked / batched (prefix sharing) = "
            f"{med['stacked'] / med['batched']:.2f}x"
        )
    for name in frames:
        if name != "naive":
            print(
                f"max |difference| {name} vs naive (value, ci_low, ci_high): "
                f"{max_abs_diff(frames[name], frames['naive']):.2e}"
            )


if __name__ == "__main__":
    main()
