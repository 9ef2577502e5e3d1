"""`cliviz train` and `cliviz attach` lose nothing: outputs never over inputs, one writer per folder,
a kill at every file operation of the save path, a full disk, a tampered training state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import main_outcome, one_error_line

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def tiny_settings(**changes):
    from cliviz.train import TrainSettings

    return TrainSettings(**({"steps": 2, "batch_size": 2, "warmup": 1, "log_every": 1} | changes))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A tiny run stopped at step 1 of 2: a model folder plus its resumable state."""
    from cliviz.train.run import run_training

    out = tmp_path_factory.mktemp("stopped") / "run"
    run_training(tiny_settings(stop_step=1), out)
    assert (out / "train_state.safetensors").is_file() and (out / "model.safetensors").is_file()
    return out


# --------------------------------------------------------------------------- outputs never over inputs
@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_over_init_from_is_refused_before_any_work(stopped, tmp_path, monkeypatch, capsys, where):
    base = tmp_path / "parent" / "base"
    shutil.copytree(stopped, base)
    before = snapshot(base)
    out = {"same": base, "inside": base / "sub", "contains": tmp_path / "parent"}[where]
    code, _, err = main_outcome("train", "--init-from", str(base), "--steps", "1", "--out", str(out))
    one_error_line(code, err, "--init-from")
    assert snapshot(base) == before and not (base / "sub").exists()


def test_attach_out_over_base_is_refused(stopped, tmp_path, monkeypatch, capsys):
    code, _, err = main_outcome("attach", "--base", str(stopped), "--out", str(stopped / "cli"))
    one_error_line(code, err, "inside the --base folder")
    assert not (stopped / "cli").exists()


def test_a_model_or_another_runs_state_needs_overwrite(stopped, tmp_path, monkeypatch, capsys):
    """A new run into a folder with another run's state, or attach over a trained model, kept nothing."""
    other = tmp_path / "other"
    shutil.copytree(stopped, other)
    before = snapshot(other)
    code, _, err = main_outcome("train", "--steps", "1", "--batch-size", "2", "--out", str(other))
    one_error_line(code, err, "already holds another run's training state")
    assert "--resume" in err and "--overwrite" in err
    (other / "train_state.safetensors").unlink()
    code, _, err = main_outcome("train", "--steps", "1", "--batch-size", "2", "--out", str(other))
    one_error_line(code, err, "already holds a model")
    base = tmp_path / "llava"
    from llava_folders import llava15_folder

    llava15_folder(base)
    capsys.readouterr()  # the folder's own save progress
    code, _, err = main_outcome("attach", "--base", str(base), "--out", str(other))
    one_error_line(code, err, "already holds a model")
    assert snapshot(other) == {k: v for k, v in before.items() if k != "train_state.safetensors"}
    code, _, err = main_outcome("attach", "--base", str(base), "--out", str(other), "--overwrite")
    assert code == 0, err
    assert json.loads((other / "config.json").read_text())["base_config"]["model_type"] == "llava"


def test_resume_may_write_back_into_its_own_run(stopped, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    code, out, err = main_outcome("train", "--resume", str(run))
    assert code == 0, err
    assert not (run / "train_state.safetensors").exists() and "after 2 steps" in out


# --------------------------------------------------------------------------- one writer per folder
HOLDER = textwrap.dedent("""
    import sys
    from cliviz.outputs import output_lock
    with output_lock(sys.argv[1], "cliviz train"):
        print("held", flush=True)
        sys.stdin.readline()
""")


@pytest.mark.parametrize("command", ["train", "attach"])
def test_second_writer_is_refused_naming_the_holder(stopped, tmp_path, monkeypatch, capsys, command):
    out, base = tmp_path / "out", stopped  # any folder with a config.json gets as far as the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], env=ENV, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = {
            "train": ("train", "--steps", "1", "--batch-size", "2", "--out", str(out)),
            "attach": ("attach", "--base", str(base), "--out", str(out)),
        }[command]
        code, _, err = main_outcome(*args)
        line = one_error_line(code, err, "being written by another cliviz process")
        assert f"process {holder.pid}, cliviz train" in line
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- a kill at every file operation
def _fork_run(trainer, out: Path, fault: dict[str, str]) -> int:
    """Run `trainer` to its end in a forked child writing `out`, with `fault` in its environment;
    the child's wait status (a SIGKILL shows as the signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ.update(fault)
            trainer.out = out
            trainer.run()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return status


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("start", ["fresh", "resumed"])
def test_a_kill_at_every_file_operation_leaves_a_resumable_or_finished_folder(stopped, tmp_path, start):
    """SIGKILL at each file operation of the save path of a fresh and of a resumed run: each time the
    folder is either finished (loads, no state) or resumable, and the resume ends in the very model
    of the uninterrupted run."""
    from cliviz.model.loading import load_model
    from cliviz.train import read_train_state, settings_from_state
    from cliviz.train.loop import Trainer
    from cliviz.train.run import run_training

    cpu = torch.device("cpu")

    def prepared(name: str) -> Path:
        folder = tmp_path / name
        if start == "resumed":
            shutil.copytree(stopped, folder)
        return folder

    def trainer_for(folder: Path) -> Trainer:
        if start == "resumed":
            state = read_train_state(folder)
            return Trainer(settings_from_state(state), folder, cpu, resume=state)
        return Trainer(tiny_settings(), folder, cpu)

    log = tmp_path / "operations.txt"
    reference = prepared("reference")
    assert _fork_run(trainer_for(reference), reference, {"CLIVIZ_FAULT_LOG": str(log)}) == 0
    operations = log.read_text().splitlines()
    names = [line.split("\t")[1] for line in operations]
    assert "rename train_state.safetensors" in names and "rename model.safetensors" in names
    assert names[-1] == "delete train_state.safetensors" and len(names) >= 10
    expected = _weights(reference)
    first_save = names.index("rename train_state.safetensors") + 1  # a fresh run has saved nothing before it
    outcomes = set()
    for k, name in enumerate(names, start=1):
        folder = prepared(f"kill-{k}")
        status = _fork_run(trainer_for(folder), folder, {"CLIVIZ_FAULT": f"kill@{k}"})
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, name, status)
        if (folder / "train_state.safetensors").exists():
            outcomes.add("resumable")
            state = read_train_state(folder)
            run_training(settings_from_state(state), folder, cpu, resume=state)
        elif (folder / "model.safetensors").exists():
            outcomes.add("finished")
        else:  # killed before its first save: nothing was there to lose, and a new run may start there
            assert start == "fresh" and k <= first_save, (k, name)
            outcomes.add("not yet saved")
            run_training(tiny_settings(), folder, cpu)
        assert not (folder / "train_state.safetensors").exists()
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], (k, name)
        load_model(folder, device="cpu")
        got = _weights(folder)
        assert all(torch.equal(expected[key], got[key]) for key in expected), (k, name)
    assert "resumable" in outcomes  # the last operation is the state's deletion: after it, finished


# --------------------------------------------------------------------------- a full disk
def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` up to `leave` free bytes."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as fh:
        fh.truncate(0)
        remaining = free - leave
        chunk = b"\0" * 2**20
        while remaining > 0:
            fh.write(chunk[: min(len(chunk), remaining)])
            remaining -= min(len(chunk), remaining)


def _can_mount(point: Path) -> bool:
    point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(point)]
    return subprocess.run(mount, capture_output=True).returncode == 0


def test_disk_full_is_one_line_and_keeps_the_previous_state(stopped, tmp_path, monkeypatch, capsys):
    """A resumed run finishing on a full disk: one error line, exit 2, the state it resumed from kept.
    On a real 24 MB tmpfs where this test may mount one, else with "no space left" injected at the
    state's first write."""
    disk = tmp_path / "disk"
    real = _can_mount(disk)
    try:
        run = disk / "run"
        shutil.copytree(stopped, run)
        before = snapshot(run)
        if real:
            _fill(disk, leave=2 * 2**20)
        else:
            import cliviz.atomic

            monkeypatch.setitem(cliviz.atomic._FAULT, "count", 0)
            monkeypatch.setenv("CLIVIZ_FAULT", "enospc@2")  # the write of train_state.safetensors
        code, _, err = main_outcome("train", "--resume", str(run))
        one_error_line(code, err, "space")
        after = snapshot(run)
        assert after["train_state.safetensors"] == before["train_state.safetensors"]
        assert after["model.safetensors"] == before["model.safetensors"]
        assert not [p for p in run.iterdir() if p.name.startswith(".")]
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("at", ["staged", "write"])
def test_a_write_error_while_finishing_is_one_line(stopped, tmp_path, monkeypatch, capsys, at):
    """Where free space cannot be known beforehand, the write error itself becomes the one line."""
    import cliviz.atomic

    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    state_before = (run / "train_state.safetensors").read_bytes()
    monkeypatch.setitem(cliviz.atomic._FAULT, "count", 0)
    monkeypatch.setenv("CLIVIZ_FAULT", {"staged": "enospc@4", "write": "enospc@2"}[at])
    code, _, err = main_outcome("train", "--resume", str(run))
    one_error_line(code, err, "no space left")
    if at == "write":
        assert (run / "train_state.safetensors").read_bytes() == state_before
    assert (run / "train_state.safetensors").is_file() and not list(run.glob(".finishing-*"))


# --------------------------------------------------------------------------- a tampered state
def _tamper(folder: Path, change) -> None:
    path = folder / "train_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _meta(key: str, edit):
    def change(tensors, metadata):
        value = json.loads(metadata[key])
        metadata[key] = json.dumps(edit(value))

    return change


def _first_weight(tensors) -> str:
    return next(k for k in tensors if k.startswith("model/"))


def _nan_weight(tensors, metadata):
    tensors[_first_weight(tensors)] = torch.full_like(tensors[_first_weight(tensors)], float("nan"))


def _wrong_shape(tensors, metadata):
    key = _first_weight(tensors)
    tensors[key] = torch.zeros(tensors[key].numel() + 1)


def _rng_dtype(tensors, metadata):
    tensors["rng/torch"] = tensors["rng/torch"].to(torch.int32)


def _steps(tensors, metadata):
    metadata["step"] = "-1"


TAMPERED = {
    "nan weight": (_nan_weight, "non-finite"),
    "param_groups empty": (_meta("param_groups", lambda v: []), "param_groups"),
    "wrong shape": (_wrong_shape, "shape"),
    "rng dtype": (_rng_dtype, "rng"),
    "step -1": (_steps, "step"),
    "batch_size x": (_meta("settings", lambda v: v | {"batch_size": "x"}), "batch_size"),
    "next_batch -5": (_meta("data", lambda v: v | {"next_batch": -5}), "next_batch"),
    "steps -1": (_meta("settings", lambda v: v | {"steps": -1}), "positive"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_state_is_one_error_line(stopped, tmp_path, monkeypatch, capsys, case):
    change, needle = TAMPERED[case]
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    _tamper(run, change)
    before = snapshot(run)
    code, _, err = main_outcome("train", "--resume", str(run))
    one_error_line(code, err, needle)
    assert snapshot(run) == before


# --------------------------------------------------------------------------- what a save holds
def test_periodic_saves_hold_the_trained_weights_only(tmp_path):
    """A checkpoint every step writes the training state, never the model folder (the frozen base is
    referenced through init_from, not rewritten)."""
    from cliviz.train.loop import Trainer

    trainer = Trainer(tiny_settings(steps=3, stop_step=2, checkpoint_minutes=0.0), tmp_path / "p", torch.device("cpu"))
    writes = []
    trainer.save_model = lambda summary=None: writes.append("model")  # noqa: ARG005 - record, do not write
    trainer.loader = iter(trainer.loader)
    batch = next(trainer.loader)
    trainer.data.add(batch)
    trainer.train_step([batch], 0.0)  # one micro-batch per step
    trainer.checkpoint()
    assert writes == [] and (tmp_path / "p" / "train_state.safetensors").is_file()
    assert not (tmp_path / "p" / "model.safetensors").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_saved_base_is_bit_identical_to_its_source_whatever_the_compute_dtype(tmp_path, dtype):
    """A float16 LLaVA held in bf16 (or fp16) for training, its CLI weights moved: every base tensor of
    the saved folder equals the source folder's bit for bit (a round trip through bf16 would not),
    and the trained weights are the trained ones."""
    from llava_folders import llava15_folder
    from PIL import Image

    from cliviz.train.loop import Trainer

    base = llava15_folder(tmp_path / "base", dtype=torch.float16)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(data / "images" / "0.png")
    turns = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]
    row = {"image": "0.png", "conversations": turns}
    (data / "train.json").write_text(json.dumps([row]))
    settings = tiny_settings(
        init_from=str(base), data=str(data / "train.json"), image_folder=str(data / "images"), dtype=dtype
    )
    out = tmp_path / "out"
    trainer = Trainer(settings, out, torch.device("cpu"))
    assert trainer.model.base.dtype == getattr(torch, dtype)
    with torch.no_grad():  # what training does to the trained part
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.add_(0.01)
    trainer.finish()
    source = load_file(base / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    round_trip = [k for k, v in source.items() if not torch.equal(v.to(getattr(torch, dtype)).to(v.dtype), v)]
    assert dtype == "float16" or round_trip  # the test has teeth: bf16 changes float16 values
    for key, value in source.items():
        got = saved["base." + key]
        assert got.dtype == value.dtype and torch.equal(got.view(torch.int16), value.view(torch.int16)), key
    trained = {n: p for n, p in trainer.model.named_parameters() if n.startswith("agf.") and p.requires_grad}
    name, param = next(iter(trained.items()))
    assert torch.equal(saved[name], param.detach().to(torch.float16))
