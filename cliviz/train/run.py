"""`run_training`: the one library call behind `cliviz train`, with every guard of its output folder.

`Trainer` trains; this function decides whether it may: `--out` never over an input folder, never
over a model or another run's state without `overwrite` (a resume may write back into its own run),
and one writer per folder (the main process holds `--out`'s lock for the whole run; under torchrun
the other ranks write nothing there).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from cliviz.atomic import remove_stale_temporaries
from cliviz.errors import CLIVizError
from cliviz.launch import Dist
from cliviz.outputs import check_replaceable, output_lock, refuse_out_over_inputs
from cliviz.train.settings import TrainSettings
from cliviz.train.state import STATE_FILE, SavedState


def _main_rank() -> bool:
    return Dist.from_env().main


def run_training(
    settings: TrainSettings,
    out: str | Path,
    device: torch.device | str = "cpu",
    *,
    resume: SavedState | None = None,
    save_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    on_start: Callable[[object], None] | None = None,
) -> dict:
    """Train to `out` and return the run's summary (see `cliviz.train.loop.Trainer`).

    `resume`: a state from `read_train_state` to carry on; `on_start(trainer)` runs once the model is
    built (the command attaches its progress bar there). Raises CLIVizError for a bad setting or an
    output folder this run may not write. Example::

        from cliviz.train import TrainSettings, run_training
        summary = run_training(TrainSettings(steps=2, batch_size=2), "runs/tiny-check")
    """
    from cliviz.train.loop import Trainer
    from cliviz.train.saving import remove_stale_staging

    out = Path(out)
    check_settings(settings)
    inputs = {"--init-from": settings.init_from, "--vision-from": settings.vision_from}
    refuse_out_over_inputs(out, {k: Path(v) for k, v in inputs.items() if v})
    resuming = resume.run if resume is not None else None
    check_replaceable(out, overwrite, resuming)
    device = torch.device(device) if isinstance(device, str) else device
    if not _main_rank():
        trainer = Trainer(settings, out, device, resume=resume, save_dtype=save_dtype)
        if on_start is not None:
            on_start(trainer)
        return trainer.run()
    with output_lock(out, "cliviz train"):
        check_replaceable(out, overwrite, resuming)  # again, now that no other process can write here
        remove_stale_staging(out)
        remove_stale_temporaries(out / STATE_FILE)  # a state write a kill interrupted
        trainer = Trainer(settings, out, device, resume=resume, save_dtype=save_dtype)
        if on_start is not None:
            on_start(trainer)
        return trainer.run()


def check_settings(settings: TrainSettings) -> None:
    """Every setting checked before a model is built; one CLIVizError naming the first bad one."""
    try:
        settings.check()
    except ValueError as err:
        raise CLIVizError(str(err)) from None
