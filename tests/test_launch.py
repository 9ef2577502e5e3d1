"""One reading of a torchrun launch (`cliviz.launch.Dist`) for the sweep and training: a launch
that contradicts itself is one line before any file or model is touched."""

from __future__ import annotations

import pytest

from cliviz.errors import CLIVizError
from cliviz.launch import Dist

from conftest import BUNDLED, main_outcome, one_error_line


def _launch(monkeypatch, **env: str) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_a_plain_run_is_rank_0_of_1(monkeypatch):
    _launch(monkeypatch)
    assert Dist.from_env() == Dist(0, 1, 0) and Dist.from_env().main and not Dist.from_env().enabled


def test_torchrun_environment_is_read(monkeypatch):
    _launch(monkeypatch, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1")
    where = Dist.from_env()
    assert (where.rank, where.world_size, where.local_rank) == (3, 4, 1)
    assert where.enabled and not where.main


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent launch"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "inconsistent launch"),
        ({"WORLD_SIZE": "0"}, "inconsistent launch"),
        ({"LOCAL_RANK": "-2"}, "inconsistent launch"),
        ({"WORLD_SIZE": "two"}, "must be integers"),
    ],
)
def test_contradicting_launches_are_refused(monkeypatch, env, needle):
    _launch(monkeypatch, **env)
    with pytest.raises(CLIVizError, match=needle):
        Dist.from_env()


def test_init_distributed_reads_the_same_launch(monkeypatch):
    import torch

    from cliviz.train.distributed import init_distributed

    _launch(monkeypatch)
    assert init_distributed(torch.device("cpu")) == Dist()
    _launch(monkeypatch, RANK="5", WORLD_SIZE="2")
    with pytest.raises(CLIVizError, match="inconsistent launch"):
        init_distributed(torch.device("cpu"))


@pytest.mark.parametrize("command", ["sweep", "train"])
def test_commands_refuse_a_bad_launch_in_one_line_and_write_nothing(monkeypatch, tmp_path, command):
    _launch(monkeypatch, RANK="3", WORLD_SIZE="2")
    out = tmp_path / "out"
    if command == "sweep":
        args = ["sweep", "--data", str(tmp_path), "--out", str(out), "--model", str(BUNDLED)]
    else:
        args = ["train", "--steps", "1", "--out", str(out)]
    code, _, err = main_outcome(*args)
    one_error_line(code, err, "inconsistent launch")
    assert not out.exists()
