"""Where `train` and `attach` may write: never over their inputs, never over a model or another run's
state unless asked, and one writer per folder.

A model folder is hours of CPU or GPU time. Three ways to lose one, each refused before any work:
- `--out` that is, contains or lies inside an input folder (`--init-from`, `--base`,
  `--vision-from`): the run would rewrite the checkpoint it reads;
- `--out` that already holds a model (`config.json`, `*.safetensors`) or a run's training state:
  a new run or attach replaces it only with `--overwrite`; `--resume RUN` may write into RUN;
- two processes writing one folder: each holds an OS file lock on `--out` for its whole run
  (`cliviz.atomic.exclusive_writer`, the lock `sweep` holds on its output); the second is refused
  with a line naming the holder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cliviz.atomic import exclusive_writer
from cliviz.errors import CLIVizError

STATE_FILE = "train_state.safetensors"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _resolved(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def refuse_out_over_inputs(out: Path, inputs: dict[str, Path | None]) -> None:
    """CLIVizError when `out` is, contains or lies inside one of `inputs` (option name -> folder)."""
    target = _resolved(out)
    for option, folder in inputs.items():
        if folder is None:
            continue
        source = _resolved(folder)
        if target == source:
            raise CLIVizError(f"--out {out} is the {option} folder itself: write the result to a new folder")
        if source.is_relative_to(target):
            raise CLIVizError(f"--out {out} contains the {option} folder {folder}: write the result elsewhere")
        if target.is_relative_to(source):
            raise CLIVizError(f"--out {out} lies inside the {option} folder {folder}: write the result elsewhere")


def folder_holds(out: Path) -> str | None:
    """What in `out` a new writer would replace: "training state", "a model", or None."""
    out = Path(out)
    if not out.is_dir():
        return None
    if (out / STATE_FILE).exists():
        return "another run's training state"
    if any((out / name).exists() for name in MODEL_FILES) or any(out.glob("*.safetensors")):
        return "a model"
    return None


def check_replaceable(out: Path, overwrite: bool, resuming: Path | None = None) -> None:
    """CLIVizError when `out` holds a model or a run's state that this writer was not told to replace.

    `resuming`: the run folder of `--resume`; writing back into it continues that run, which is allowed.
    """
    if overwrite:
        return
    if resuming is not None and _resolved(resuming) == _resolved(out):
        return
    holds = folder_holds(out)
    if holds is not None:
        hint = "--resume it to carry that run on, " if holds.endswith("state") else ""
        raise CLIVizError(
            f"--out {out} already holds {holds}; {hint}give --overwrite to replace it, or write to a new folder"
        )


@contextmanager
def output_lock(out: Path, command: str) -> Iterator[None]:
    """Hold `out`'s write lock for the block; a second writer is refused with one line naming this one."""
    with exclusive_writer(Path(out).absolute(), "model folder", holder=command):
        yield
