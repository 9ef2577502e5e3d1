"""Cost of integrated gradients on the gates, and what batching the interpolation steps buys.

All variants attribute ONE answer token of one (image, question) on the same prepared runner
(embeddings and AMP memory computed once, gates substituted through the gate hooks), interleaved
A B C ... after a warm-up, medians reported (never one-off times):
  fwd+bwd     one forward + backward of the answer-token log-prob w.r.t. the gates (batch 1):
              the unit cost, i.e. what gradient x input costs
  ig-batched  Captum IG, `--steps` Gauss-Legendre points, `--batch` points stacked per forward
  ig-loop     the same IG with one point per forward (`internal_batch_size=1`)

Ratios printed: ig-batched / fwd+bwd (a naive loop would cost ~steps x), ig-loop / ig-batched
(the speed-up of batching the steps). Model: the bundled cli-tiny, or a random model of the same
architecture when assets/models/cli-tiny is absent (recipe of tests/conftest.py).

    python benchmarks/bench_attribute.py --repeats 10 --steps 64 --batch 16
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch: idle OpenMP threads must not spin on a shared box
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import bundled_model  # noqa: E402  (same folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64, help="IG integration steps")
    parser.add_argument("--batch", type=int, default=16, help="IG points per forward for ig-batched")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cliviz.analyses.attribution_compute import _hooks, _Runner, baseline_gates, integrated_gradients
    from cliviz.data import iter_samples
    from cliviz.inference import prepare_inputs
    from cliviz.tracing import trace

    model, tok, label = bundled_model()
    sample = next(iter_samples(1, seed=7))
    tr = trace(model, tok, sample.image, sample.question, causal_check=False)
    pix = prepare_inputs(model, tok, [sample.image], [sample.question])["pixel_values"]
    L, T, K = tr.gates.shape
    print(
        f"{label}: {len(model.agf)} gated layers x {K} vision layers, {T} tokens; "
        f"question {sample.question!r} -> {tr.meta.answer!r}",
        flush=True,
    )

    with _hooks(model) as state, torch.enable_grad():
        run = _Runner(model, state, pix, tr.answer_positions, tr.answer_ids)
        gates, _, _ = run.record(torch.tensor([tr.token_ids.tolist()]))
        base = baseline_gates(gates, "uniform")
        f = run.gate_fn(0)

        def fwd_bwd():
            g = gates[None].clone().requires_grad_(True)
            torch.autograd.grad(f(g).sum(), [g])

        def ig_batched():
            integrated_gradients(f, gates, base, args.steps, args.batch)

        def ig_loop():
            integrated_gradients(f, gates, base, args.steps, 1)

        variants = {"fwd+bwd": fwd_bwd, "ig-batched": ig_batched, "ig-loop": ig_loop}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.warmup + args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    spread = {name: (np.percentile(ts, 25), np.percentile(ts, 75)) for name, ts in times.items()}
    print(
        f"\none answer token, IG {args.steps} steps (batch {args.batch} vs 1), {args.repeats} interleaved rounds, "
        f"{torch.get_num_threads()} threads; medians [IQR]"
    )
    for name in variants:
        lo, hi = spread[name]
        print(f"  {name:<11} {med[name] * 1e3:9.1f} ms  [{lo * 1e3:.1f}, {hi * 1e3:.1f}]")
    print(f"  ig-batched / fwd+bwd : {med['ig-batched'] / med['fwd+bwd']:6.1f}x   (steps = {args.steps})")
    print(f"  ig-loop    / fwd+bwd : {med['ig-loop'] / med['fwd+bwd']:6.1f}x")
    print(f"  ig-loop / ig-batched : {med['ig-loop'] / med['ig-batched']:6.2f}x   (speed-up of batching the steps)")


if __name__ == "__main__":
    main()
