"""Batched sweep vs a Python loop of single traces, on the bundled model.

  batched  `trace_batch` over batches of --batch (32) samples: one traced generate per batch
  loop     `trace()` once per sample: one traced generate per sample

Both record the same things (gates, injection norms, top-k log-probs) for the same --n samples
(images decoded beforehand, no file I/O). Rounds alternate the variants after a warm-up; the
median round gives the throughput (samples/s) of each and their ratio. Target: >= 5x.

With --plain (default on) the same two shapes run untraced (`model.generate`, same kwargs): their
ratio is the most batching can give on this model and machine, whatever the tracing does.

    python benchmarks/bench_sweep.py --repeats 5
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

TARGET = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--n", type=int, default=96, help="samples per round (64-128 is the reference setting)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument(
        "--plain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time untraced generate, batched and one by one (the batching ceiling)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cliviz.data import iter_samples
    from cliviz.inference import generation_kwargs, prepare_inputs
    from cliviz.tracing.record import trace, trace_batch

    model, tok, label = bundled_model()
    samples = list(iter_samples(args.n, seed=11))
    images, questions = [s.image for s in samples], [s.question for s in samples]
    qtypes = [s.qtype for s in samples]

    def batched() -> int:
        done = 0
        for i in range(0, args.n, args.batch):
            done += len(
                trace_batch(
                    model,
                    tok,
                    images[i : i + args.batch],
                    questions[i : i + args.batch],
                    max_new_tokens=args.max_new_tokens,
                    qtypes=qtypes[i : i + args.batch],
                )
            )
        return done

    def loop() -> int:
        return len(
            [
                trace(model, tok, im, q, max_new_tokens=args.max_new_tokens, qtype=t, causal_check=False)
                for im, q, t in zip(images, questions, qtypes)
            ]
        )

    gen = generation_kwargs(tok, args.max_new_tokens)

    @torch.no_grad()
    def plain(size: int) -> int:
        for i in range(0, args.n, size):
            model.generate(**prepare_inputs(model, tok, images[i : i + size], questions[i : i + size]), **gen)
        return args.n

    variants = {"batched": batched, "loop": loop}
    if args.plain:
        variants |= {"plain-batched": lambda: plain(args.batch), "plain-loop": lambda: plain(1)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            assert fn() == args.n
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    rate = {name: args.n / t for name, t in med.items()}
    ratio = rate["batched"] / rate["loop"]
    print(
        f"{label}; {args.n} samples, batch {args.batch}, {args.max_new_tokens} new tokens, "
        f"{args.repeats} interleaved rounds, {torch.get_num_threads()} threads; medians"
    )
    header = f"{'variant':<14} {'median s':>9} {'samples/s':>10}"
    print(header)
    print("-" * len(header))
    for name in variants:
        print(f"{name:<14} {med[name]:>9.2f} {rate[name]:>10.1f}")
    print(
        f"traced  batched / loop throughput: {ratio:.2f}x "
        f"(target >= {TARGET:.0f}x: {'ok' if ratio >= TARGET else 'under'})"
    )
    if args.plain:
        print(
            f"untraced batched / loop throughput: {rate['plain-batched'] / rate['plain-loop']:.2f}x "
            "(the batching ceiling of this model here)"
        )


if __name__ == "__main__":
    main()
