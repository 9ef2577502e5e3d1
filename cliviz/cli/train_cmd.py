"""`cliviz train`: train a tiny model of any fusion variant on ShapesVQA."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cliviz.cli.options import DeviceOpt, SeedOpt
from cliviz.errors import CLIVizError
from cliviz.model.configuration import FUSIONS

if TYPE_CHECKING:
    import torch

    from cliviz.train_state import SavedState
    from cliviz.training import TrainSettings


RESUME_KEEPS = {"out", "resume", "stop_step", "threads", "device", "save_dtype"}  # all else comes from the saved run
SAVE_DTYPES = ("float32", "bfloat16")


def train(
    ctx: typer.Context,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write the trained model to (with --resume: the resumed run's folder unless given).")] = None,
    fusion: Annotated[str, typer.Option("--fusion", help="cli | projector | shallow | deepstack")] = "cli",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimiser steps (reproducible budget).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="Wall-clock budget instead of --steps.")] = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step (all their questions in one sequence).")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-3,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Continue training a saved model (fresh optimiser).")] = None,
    data_offset: Annotated[int, typer.Option("--data-offset", min=0, help="First training scene index (use new scenes when continuing).")] = 0,
    stop_step: Annotated[Optional[int], typer.Option("--stop-step", min=1, help="Stop at this step of the --steps schedule (an early checkpoint, e.g. to compare seeds at a matched point).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Carry on an interrupted or --stop-step run exactly (model, optimiser, aux heads, RNG from its train_state.safetensors).")] = None,
    start_step: Annotated[int, typer.Option("--start-step", min=0, help="Resume a checkpoint without training state at this step (with --init-from): the LR schedule and scenes carry on; optimiser and auxiliary heads start fresh.")] = 0,
    position_aux: Annotated[bool, typer.Option("--position-aux/--no-position-aux", help="Patch row/column and object-centre targets in the auxiliary loss.")] = True,
    extra_questions: Annotated[str, typer.Option("--extra-questions", help='More questions per image, "type:count,..." ("" for none).')] = "relation:2,position:1",
    warmup: Annotated[int, typer.Option("--warmup", min=1, help="Warmup steps.")] = 200,
    aux_layer: Annotated[int, typer.Option("--aux-layer", help="Vision hidden_states index the auxiliary loss supervises (-1: the last layer).")] = -1,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="float32 | bfloat16 for the saved model (training is float32; bfloat16 halves the folder).")] = "float32",
    device: DeviceOpt = "auto",
) -> None:
    """Train a tiny CLI model (or a baseline) from scratch; progress bar shows loss and running accuracy."""
    import torch

    from cliviz.runtime import resolve_device
    from cliviz.training import VISION_LAYERS, TrainSettings, parse_extra_questions

    if save_dtype not in SAVE_DTYPES:
        raise CLIVizError(f"unknown --save-dtype {save_dtype!r}; choose {' or '.join(SAVE_DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    dev, _ = resolve_device(device, "float32")
    if resume is not None:
        _resume(ctx, resume, out or resume, stop_step, dev, getattr(torch, save_dtype))
        return
    if out is None:
        raise CLIVizError("give --out FOLDER for the trained model")
    from cliviz.cli.preflight import check_output_folder

    check_output_folder(out, "--out folder")  # before any training: a typo must not cost a run
    if fusion not in FUSIONS:
        raise CLIVizError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    if (steps is None) == (minutes is None):
        raise CLIVizError("give exactly one of --steps or --minutes")
    if (steps is not None and steps <= 0) or (minutes is not None and minutes <= 0):
        raise CLIVizError("--steps/--minutes must be positive")
    if not -(VISION_LAYERS + 1) <= aux_layer <= VISION_LAYERS:
        raise CLIVizError(f"--aux-layer {aux_layer} is not a vision hidden_states index (0..{VISION_LAYERS}, or negative from the end)")
    try:
        parse_extra_questions(extra_questions)
    except ValueError as err:
        raise CLIVizError(str(err)) from None
    if start_step and (steps is None or start_step >= steps or init_from is None):
        raise CLIVizError("--start-step resumes a --steps run: give --init-from CHECKPOINT and a --start-step below --steps")
    if stop_step is not None and (steps is None or not start_step < stop_step <= steps):
        raise CLIVizError("--stop-step needs --steps and must lie after --start-step and at most --steps")
    if init_from is not None and not (init_from / "model.safetensors").is_file():
        raise CLIVizError(f"--init-from {init_from} holds no model.safetensors")
    settings = TrainSettings(fusion=fusion, seed=seed, steps=steps, minutes=minutes, batch_size=batch_size, lr=lr,
                             warmup=warmup, position_aux=position_aux, extra_questions=extra_questions, aux_layer=aux_layer, init_from=str(init_from) if init_from else None, data_offset=data_offset, start_step=start_step, stop_step=stop_step)
    _run(settings, out, dev, getattr(torch, save_dtype))


def _resume(ctx: typer.Context, run: Path, out: Path, stop_step: Optional[int], dev: torch.device, save_dtype: torch.dtype) -> None:
    """`--resume RUN`: the saved run's own settings, carried on from its state file."""
    from cliviz.train_state import read_train_state
    from cliviz.training import settings_from_state

    given = sorted(name for name in ctx.params if name not in RESUME_KEEPS
                   and getattr(ctx.get_parameter_source(name), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT"))
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CLIVizError(f"--resume carries on the saved run's own settings; drop {flags}")
    state = read_train_state(run)
    try:
        settings = settings_from_state(state, stop_step)
    except (TypeError, ValueError) as err:
        raise CLIVizError(f"cannot resume {run}: {err}") from None
    _run(settings, out, dev, save_dtype, state)


def _run(settings: TrainSettings, out: Path, dev: torch.device, save_dtype: torch.dtype, state: SavedState | None = None) -> None:
    """Train with a progress bar; the final line says where the model went."""
    from cliviz.training import train as run_training

    fusion = settings.fusion
    columns = (TextColumn("[bold]train[/] {task.fields[fusion]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("step {task.fields[step]} loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"), TimeElapsedColumn())
    with Progress(*columns) as progress:
        first = state.step if state else settings.start_step
        task = progress.add_task("train", total=1.0, fusion=fusion, step=first, loss=0.0, acc=0.0)

        def on_step(step: int, loss: float, acc: float, frac: float) -> None:
            progress.update(task, completed=frac, step=step, loss=loss, acc=acc)

        summary = run_training(settings, out, dev, on_step=on_step, resume=state, save_dtype=save_dtype)
    seconds = summary.get("total_seconds", summary["seconds"])
    typer.echo(f"saved {fusion} model to {out} after {summary['steps']} steps ({seconds:.0f} s)")
