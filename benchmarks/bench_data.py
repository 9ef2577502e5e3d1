"""Training data: memory of reading a large LLaVA JSON list, the cost of a resume skip, loader throughput.

  memory   peak Python allocation (tracemalloc) while walking every row of a `--rows` JSON list:
           `LlavaJsonSource.raw_rows` (ijson, streamed) versus `json.load` of the file
  skip     seconds for a stream to deliver its first batch when resumed near the end of a
           `--rows` JSONL (`start_batch`: rows read but not parsed) versus from batch 0 — the
           price of an exact resume
  loader   batches/s of `ConversationStream` (bundled word-level collator, `--image-size` PNGs decoded
           and resized to 64 px, batch 16) in process versus through a DataLoader with `--workers`
           worker processes (a fresh DataLoader per round: worker start-up included)

Variants are interleaved after a warm-up; medians and ratios are printed, never one-off times.
On the shared 2-core machine the loader ratio says little about a GPU host with many cores.

    python benchmarks/bench_data.py --rows 100000 --repeats 3
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch: idle OpenMP threads must not spin on a shared box
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conversation_data import llava_dataset, llava_row, word_level, write_jsonl, write_png  # noqa: E402

from cliviz.data.collate import collator_for_model  # noqa: E402
from cliviz.data.loader import ConversationStream, make_loader  # noqa: E402
from cliviz.data.sources import LlavaJsonSource  # noqa: E402


def peak_mib(fn) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_batch(stream) -> None:
    next(iter(make_loader(stream)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    rows, images = llava_dataset(root, 64, turns=3)
    big = [dict(llava_row(i % 64, turns=3), id=f"row-{i}") for i in range(args.rows)]
    (root / "big.json").write_text(json.dumps(big))
    write_jsonl(root / "big.jsonl", big)
    del big
    size_mib = (root / "big.json").stat().st_size / 2**20
    tok, config = word_level()
    collator = collator_for_model(config, tok)

    def stream_list() -> None:
        for _ in LlavaJsonSource(root / "big.json").raw_rows():
            pass

    def load_list() -> None:
        with open(root / "big.json", "rb") as f:
            json.load(f)

    memory = {"ijson stream": [], "json.load": []}
    for _ in range(args.repeats):
        memory["ijson stream"].append(peak_mib(stream_list))
        memory["json.load"].append(peak_mib(load_list))
    print(f"memory: {args.rows:,} rows, {size_mib:.1f} MiB JSON list; peak Python allocation (median MiB)")
    for name, values in memory.items():
        print(f"  {name:14s} {statistics.median(values):8.2f}")

    def make(start: int, source=None) -> ConversationStream:
        return ConversationStream(
            source or LlavaJsonSource(root / "big.jsonl", images), collator, 16, start_batch=start
        )

    last = args.rows // 16 - 2
    skip = {"from batch 0": [], f"resume at {last}": []}
    first_batch(make(0))  # warm-up
    for _ in range(args.repeats):
        skip["from batch 0"].append(timed(lambda: first_batch(make(0))))
        skip[f"resume at {last}"].append(timed(lambda: first_batch(make(last))))
    a, b = (statistics.median(v) for v in skip.values())
    print(f"skip: seconds to the first batch (median); resume / fresh = {b / a:.1f}x")
    for name, values in skip.items():
        print(f"  {name:16s} {statistics.median(values):8.3f}")

    small = root / "small.jsonl"
    write_jsonl(small, [dict(r, id=f"{r['id']}-{k}") for k in range(8) for r in rows])
    photos = root / "photos"
    for i in range(64):
        write_png(photos / f"{i}.png", i, size=args.image_size)

    def run(workers: int) -> None:
        stream = ConversationStream(LlavaJsonSource(small, photos), collator, 16)
        for n, _ in enumerate(make_loader(stream, num_workers=workers)):
            if n + 1 == args.batches:
                break

    loader = {"in process": [], f"{args.workers} workers": []}
    run(0)
    for _ in range(args.repeats):
        loader["in process"].append(args.batches / timed(lambda: run(0)))
        loader[f"{args.workers} workers"].append(args.batches / timed(lambda: run(args.workers)))
    a, b = (statistics.median(v) for v in loader.values())
    print(
        f"loader: batches/s (median, batch 16, 3-turn rows, {args.image_size} px PNGs); "
        f"workers / in process = {b / a:.2f}x"
    )
    for name, values in loader.items():
        print(f"  {name:16s} {statistics.median(values):8.2f}")


if __name__ == "__main__":
    main()
