"""Ranks of one node load the checkpoint in turn (`distributed.load_in_turn`), so a node holds one
host copy of the model at a time: two real gloo processes, their load intervals must not overlap."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import REPO

WORKER = """
import json, os, sys, time
import torch.distributed as dist
from cliviz.train.distributed import Dist, load_in_turn

dist.init_process_group("gloo")
where = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))

def load():
    start = time.monotonic()
    time.sleep(0.4)  # a checkpoint read
    return {"rank": where.rank, "start": start, "end": time.monotonic()}

got = load_in_turn(where, load)
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(got) + "\\n")
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_load_one_after_the_other(tmp_path):
    log = tmp_path / "loads.jsonl"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env.update(LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(log)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    loads = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda x: x["start"])
    assert [x["rank"] for x in loads] == [0, 1]  # local rank 0 first
    assert loads[0]["end"] <= loads[1]["start"]  # never both at once


def test_one_process_just_loads():
    from cliviz.train.distributed import Dist, load_in_turn

    assert load_in_turn(Dist(), lambda: 42) == 42
