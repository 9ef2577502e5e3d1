"""Cost of the causal check that `trace()` adds to every map: `trace(..., causal_check=False)` vs
`trace(...)` (the check: one call of the batched ablation engine — its teacher-forced reference row
and one injection-off row, no generation), on the bundled model and the seven bundled examples.

Variants interleaved per example after a warm-up; prints medians and the ratio.

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


if __name__ == "__main__":
    main()
