"""Start-up cost of the command line: `cliviz --help` and a mistyped option, against importing
torch + transformers (what every command paid before commands imported them lazily).

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
    return {
        "cliviz --help": [script, "--help"],
        "cliviz trace --bogus (usage error)": [script, "trace", "--bogus"],
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
    print(f"{'variant':42s} {'median s':>9s} {'min s':>7s} {'vs torch+transformers':>22s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:42s} {med:9.3f} {min(ts):7.3f} {med / ref:21.2f}x")


if __name__ == "__main__":
    main()
