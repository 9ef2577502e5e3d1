"""What CLI-only training costs (`cliviz train --init-from ATTACHED --data llava.json`):

1. samples/s and tokens/s of CLI-only training steps on the CPU, for a tiny (CLIP 3 x 32, Llama
   3 x 64) and a mid-size (CLIP 24 x 256, 144 patches; Llama 8 x 512, vocab 32k) random LLaVA,
   attached and trained on a LLaVA-format file, with and without the frozen tower's states cached
   (`--cache-vision`, the second epoch onwards), interleaved, medians;
2. trainable parameters and AdamW state for LLaVA-1.5-7B and LLaVA-OV-7B with the light read
   (meta device) — target: optimiser state < 2 GB at 7B;
3. DDP with 2 processes (gloo) vs 1 process on the CPU, samples/s ratio at the same per-process
   batch (reported only: this machine has 2 cores).

    python benchmarks/bench_train.py --steps 12
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch: idle OpenMP threads must not spin on a shared box
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
OPT_TARGET_BYTES = 2 * 2**30


def write_data(root: Path, n: int = 64, size: int = 64) -> tuple[Path, Path]:
    """A LLaVA instruction file of `n` two-turn conversations about random images."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": "A picture of some coloured noise, with no object in it."},
                    {"from": "human", "value": "Which colour dominates?"},
                    {"from": "gpt", "value": "None of them."},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json", images


def attached_folder(root: Path, which: str) -> Path:
    """A random LLaVA-1.5 folder (tokenizer, chat template, processor) attached by `cliviz attach`."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from llava_folders import llava15_base, llava15_folder, llava15_tokenizer

    from cliviz.model.attach import attach_folder

    base = root / f"{which}-base"
    if which == "tiny":
        llava15_folder(base, dtype=torch.float32)
    else:
        from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

        from common import mid_size_llava_config

        llava15_folder(base, dtype=torch.float32)  # tokenizer, template and processor files
        tok = llava15_tokenizer()
        cfg = mid_size_llava_config(tok)
        torch.manual_seed(0)
        LlavaForConditionalGeneration(cfg).save_pretrained(base)
        CLIPImageProcessor(size={"shortest_edge": 192}, crop_size={"height": 192, "width": 192}).save_pretrained(base)
        del llava15_base
    attach_folder(base, root / which)
    return root / which


def step_seconds(folder: Path, data: Path, images: Path, *, cache: bool, steps: int, batch: int) -> tuple[float, float]:
    """(median seconds per step, tokens per step) of CLI-only training; with `cache`, the steps of
    the second pass over the data (every state already kept)."""
    from cliviz.train import Trainer, TrainSettings

    settings = TrainSettings(
        init_from=str(folder),
        data=str(data),
        image_folder=str(images),
        steps=10_000,
        batch_size=batch,
        lr=1e-3,
        warmup=5,
        cache_vision=cache,
        shuffle_window=1,
        log_every=10_000,
        checkpoint_minutes=1e9,
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(settings, Path(out), torch.device("cpu"))
        per_pass = 64 // batch
        times, tokens = [], []
        for i, b in enumerate(trainer.loader):
            if i >= per_pass + steps:
                break
            t0 = time.perf_counter()
            tokens.append(trainer.train_step([b], 0.5))  # one micro-batch per step
            if i >= per_pass:  # the first pass fills the cache (and warms up)
                times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(tokens)


def report_throughput(steps: int, batch: int) -> None:
    print(
        f"1. CLI-only training steps on the CPU ({torch.get_num_threads()} threads), batch {batch}, medians of {steps}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for which, size in (("tiny", 32), ("mid-size", 192)):
            data, images = write_data(root / f"data-{which}", size=size)
            folder = attached_folder(root, which)
            rows = {}
            for _ in range(2):  # interleave: cache off, on, off, on
                for cache in (False, True):
                    rows.setdefault(cache, []).append(
                        step_seconds(folder, data, images, cache=cache, steps=steps, batch=batch)
                    )
            plain = statistics.median(r[0] for r in rows[False])
            cached = statistics.median(r[0] for r in rows[True])
            tokens = rows[False][0][1]
            print(
                f"   {which:<9} {batch / plain:7.1f} samples/s {tokens / plain:9.0f} tokens/s   cached states: "
                f"{batch / cached:7.1f} samples/s ({plain / cached:.2f}x)"
            )


def report_optimiser_state() -> None:
    sys.path.insert(0, str(HERE))
    from bench_cli_cost import count_params, llava15_7b, onevision

    print("2. CLI-only training of 7B checkpoints, light read, attach defaults (meta device)")
    for name, base in (("LLaVA-1.5-7B", llava15_7b()), ("LLaVA-OV-7B", onevision("7b"))):
        base_params, cli_params, _ = count_params(base, "light")
        trainable = cli_params - base_params
        state = trainable * 4 * 2 + trainable * 4  # AdamW moments + fp32 master weights
        verdict = "ok" if state < OPT_TARGET_BYTES else "OVER"
        print(
            f"   {name:<13} trainable {trainable / 1e6:6.1f} M of {cli_params / 1e9:.2f} B; AdamW moments + fp32 "
            f"weights {state / 2**20:7.1f} MB (target < 2 GB: {verdict})"
        )


def report_ddp(steps: int, batch: int) -> None:
    """Wall time of the same number of steps, 1 process vs torchrun with 2 (2x the samples)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, images = write_data(root / "data", size=32)
        folder = attached_folder(root, "tiny")
        common = [
            "train",
            "--init-from",
            str(folder),
            "--data",
            str(data),
            "--image-folder",
            str(images),
            "--steps",
            str(steps),
            "--batch-size",
            str(batch),
            "--device",
            "cpu",
            "--log-every",
            str(steps),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        times = {}
        for name, prefix in (
            ("1 process", [sys.executable, "-m", "cliviz"]),
            ("2 processes", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "cliviz"]),
        ):
            t0 = time.perf_counter()
            subprocess.run(
                prefix + common + ["--out", str(root / name.replace(" ", "-"))],
                check=True,
                env=env,
                capture_output=True,
            )
            times[name] = time.perf_counter() - t0
        one, two = batch * steps / times["1 process"], 2 * batch * steps / times["2 processes"]
        print(
            f"3. DDP (gloo, 1 thread each), {steps} steps of batch {batch} per process, start-up included: "
            f"1 process {one:.1f} samples/s, 2 processes {two:.1f} samples/s ({two / one:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report_optimiser_state()
    report_throughput(args.steps, args.batch)
    report_ddp(max(args.steps, 20), args.batch)


if __name__ == "__main__":
    main()
