"""Start-up cost of the command line: `cliviz --help`, a mistyped option, and the input errors that
are checked before torch is imported (a missing image, a bad --kind / --method, a missing model
folder; target: under 1 s on an idle machine), against importing torch + transformers (what every
command paid before commands imported them lazily).

Each variant runs as a fresh process (the console script of this environment), interleaved
(A B C A B C ...), after one warm-up round that fills the OS file cache. Prints the median wall
time of each variant and the ratio to the torch+transformers import.

    python benchmarks/bench_cli_startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def variants() -> dict[str, list[str]]:
    script = shutil.which("cliviz") or str(Path(sys.executable).with_name("cliviz"))
    image = str(Path(__file__).resolve().parents[1] / "assets" / "examples" / "color.png")
    return {
        "cliviz --help": [script, "--help"],
        "cliviz trace --bogus (usage error)": [script, "trace", "--bogus"],
        "cliviz attribute missing.png (no image)": [script, "attribute", "missing.png", "what ?"],
        "cliviz attribute --method saliency": [script, "attribute", image, "what ?", "--method", "saliency"],
        "cliviz ablate --kind melt": [script, "ablate", image, "what ?", "--kind", "melt"],
        "cliviz attribute --model missing/": [script, "attribute", image, "what ?", "--model", "missing/"],
        "python -c 'import cliviz'": [sys.executable, "-c", "import cliviz"],
        "python -c 'import torch, transformers'": [sys.executable, "-c", "import torch, transformers"],
    }


def run_once(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    cmds = variants()
    for cmd in cmds.values():  # warm-up: file cache
        run_once(cmd)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            times[name].append(run_once(cmd))
    ref = statistics.median(times["python -c 'import torch, transformers'"])
    print(f"{'variant':44s} {'median s':>9s} {'min s':>7s} {'vs torch+transformers':>22s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:44s} {med:9.3f} {min(ts):7.3f} {med / ref:21.2f}x")


if __name__ == "__main__":
    main()
