"""Cost of the causal check that `trace()` adds to every map: `trace(..., causal_check=False)` vs
`trace(...)`. The check feeds the answer the trace generated, teacher-forced, through the base alone
(every injection off) in one forward with logits at the answer positions only — no generation.

1. the bundled model on the seven bundled examples (one-word answers);
2. the mid-size LLaVA-1.5 shape (CLIP 24 x 256 at 192 px, Llama 8 x 512, 32k vocabulary, alpha
   opened) at 32 new tokens — target: trace with the check <= 1.3x trace without.

Variants interleaved after a warm-up; prints medians and the ratio.

    python benchmarks/bench_causal_check.py --repeats 10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens of the mid-size traces")
    args = parser.parse_args()
    import torch

    from cliviz.inputs import load_image
    from cliviz.tracing import trace

    from common import bundled_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, label = bundled_model()
    examples = Path(__file__).resolve().parents[1] / "assets" / "examples"
    rows = [json.loads(line) for line in (examples / "samples.jsonl").read_text().splitlines() if line.strip()]
    samples = [(load_image(examples / r["image"]), r["question"]) for r in rows]
    times = {"trace without check": [], "trace with check": []}
    for round_ in range(args.warmup + args.repeats):
        for image, question in samples:
            for name, check in (("trace without check", False), ("trace with check", True)):
                start = time.perf_counter()
                trace(model, tok, image, question, causal_check=check)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["trace without check"])
    print(f"{label}, {len(samples)} examples x {args.repeats} rounds, torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} median {1000 * med:7.1f} ms  ratio {med / base:.2f}x")
    print(f"added per trace: {1000 * (statistics.median(times['trace with check']) - base):.1f} ms (median difference)")
    midsize_ratio(args.repeats, args.warmup, args.tokens)


def midsize_ratio(repeats: int, warmup: int, tokens: int) -> None:
    """trace with / without the check on the mid-size LLaVA-1.5 shape, `tokens` new tokens."""
    from bench_cli_cost import midsize, midsize_inputs

    from cliviz.data import iter_samples
    from cliviz.tracing import trace

    _, cli, tok = midsize()
    del midsize_inputs
    sample = next(iter(iter_samples(1, seed=7)))
    times = {"trace without check": [], "trace with check": []}
    lengths = []
    for round_ in range(warmup + repeats):
        for name, check in (("trace without check", False), ("trace with check", True)):
            start = time.perf_counter()
            t = trace(cli, tok, sample.image, sample.question, max_new_tokens=tokens, causal_check=check)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                lengths.append(len(t.answer_ids))
    base = statistics.median(times["trace without check"])
    print(f"mid-size LLaVA-1.5 shape, {tokens} new tokens (answers of {min(lengths)}-{max(lengths)}), {repeats} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} median {1000 * med:7.1f} ms  ratio {med / base:.2f}x  (target <= 1.3x)")


if __name__ == "__main__":
    main()
