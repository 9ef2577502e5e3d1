"""`cliviz train`: a tiny model from scratch, or CLI's modules on a frozen checkpoint; resumable.

The command parses and prints. Its options are the fields of `cliviz.train.TrainSettings`, declared
there once with their flag, help and every check (the typer signature below is built from them), plus
the few that are about this invocation rather than the run: `--out`, `--resume`, `--overwrite`,
`--save-dtype`, `--threads`, `--device`. It builds the settings and calls `run_training`.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from cliviz.cli.options import DeviceOpt
from cliviz.errors import CLIVizError
from cliviz.launch import Dist
from cliviz.train.settings import SettingError, command_line_fields

if TYPE_CHECKING:
    import torch

    from cliviz.train import SavedState, TrainSettings


SAVE_DTYPES = ("float32", "bfloat16", "float16")
# Options about this invocation, not the run: --resume keeps the saved run's settings and takes only these.
INVOCATION = {
    "out": (
        Annotated[
            Path | None,
            typer.Option("--out", help="Folder for the trained model (with --resume: the run's folder unless given)."),
        ],
        None,
    ),
    "resume": (
        Annotated[
            Path | None,
            typer.Option(
                "--resume",
                help="Carry on an interrupted or --stop-step run exactly (weights, optimiser, RNG, data position from "
                "its train_state.safetensors).",
            ),
        ],
        None,
    ),
    "overwrite": (
        Annotated[
            bool,
            typer.Option(
                "--overwrite",
                help="Replace the model or training state --out already holds (refused otherwise; --resume may write "
                "back into its own run).",
            ),
        ],
        False,
    ),
    "save_dtype": (
        Annotated[
            str | None,
            typer.Option(
                "--save-dtype",
                help="float32 | bfloat16 | float16 for the saved model (default: the dtype the --init-from checkpoint "
                "is stored in; float32 from scratch). The frozen base is always copied as it was stored.",
            ),
        ],
        None,
    ),
    "threads": (Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")], None),
    "device": (DeviceOpt, "auto"),
}
RESUME_KEEPS = {*INVOCATION, "stop_step", "num_workers"}  # all else: the saved run's


def _parameters() -> list[inspect.Parameter]:
    """The command's signature: every `TrainSettings` field that has a flag, then the invocation options."""
    from cliviz.train.settings import TrainSettings

    hints = typing.get_type_hints(TrainSettings)
    params = []
    for f in command_line_fields():
        meta = f.metadata
        option = typer.Option(*meta["flag"].split(" "), help=meta["help"], **meta["typer"])
        default = f.default if f.default is not MISSING else None
        annotation = cast(Any, Annotated)[hints[f.name], option]  # built at run time, not a type expression
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    for name, (annotation, default) in INVOCATION.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def train(ctx: typer.Context, **options: Any) -> None:
    """Train a tiny model from scratch, or CLI's modules on a frozen checkpoint (torchrun: DDP/FSDP)."""
    import torch

    from cliviz.cli.preflight import check_output_folder
    from cliviz.runtime import resolve_device
    from cliviz.train import TrainSettings

    out, resume, save_dtype = options["out"], options["resume"], options["save_dtype"]
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise CLIVizError(f"unknown --save-dtype {save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    dev, _ = resolve_device(options["device"], "float32")
    stored = getattr(torch, save_dtype) if save_dtype else None
    if resume is not None:
        _resume(
            ctx, resume, out or resume, options["stop_step"], dev, stored, options["num_workers"], options["overwrite"]
        )
        return
    if out is None:
        raise CLIVizError("give --out FOLDER for the trained model")
    check_output_folder(out, "--out folder")  # before any training: a typo must not cost a run
    given = {f.name: options[f.name] for f in command_line_fields()}
    settings = TrainSettings(**{k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()})
    _check(settings)
    _check_paths(settings)
    _run(settings, out, dev, stored, overwrite=options["overwrite"])


def _warn_schedule(settings) -> None:
    """A run that never leaves warmup barely moves the gates; a log interval past the run logs nothing."""
    steps, warmup, log_every = settings.steps, settings.warmup, settings.log_every
    if steps is not None and warmup >= steps:
        typer.echo(f"warning: --warmup {warmup} >= --steps {steps}: the learning rate never reaches --lr", err=True)
    if steps is not None and log_every >= steps:
        typer.echo(
            f"warning: --log-every {log_every} >= --steps {steps}: training_log.jsonl gets at most one line "
            "(none when it exceeds --steps)",
            err=True,
        )


train.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context), *_parameters()]
)
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}  # type: ignore[attr-defined]


def _check(settings: TrainSettings) -> None:
    """Every check of the settings, in flag names; one error line before any model is built."""
    try:
        settings.check()
    except SettingError as err:
        raise CLIVizError(err.for_command_line()) from None


def _check_paths(settings: TrainSettings) -> None:
    for option, folder in (("--init-from", settings.init_from), ("--vision-from", settings.vision_from)):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            raise CLIVizError(f"{option} {folder} is not a model folder (no config.json)")
    if settings.data is not None and not Path(settings.data).exists():
        raise CLIVizError(f"--data {settings.data} not found")
    if settings.image_folder is not None and not Path(settings.image_folder).is_dir():
        raise CLIVizError(f"--image-folder {settings.image_folder} is not a folder")


def _resume(
    ctx: typer.Context,
    run: Path,
    out: Path,
    stop_step: int | None,
    dev: torch.device,
    save_dtype: torch.dtype | None,
    num_workers: int,
    overwrite: bool = False,
) -> None:
    """`--resume RUN`: the saved run's own settings, carried on from its state file."""
    from cliviz.cli.preflight import check_output_folder
    from cliviz.train import read_train_state, settings_from_state

    given = sorted(
        name
        for name in ctx.params
        if name not in RESUME_KEEPS
        and getattr(ctx.get_parameter_source(name), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT")
    )
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CLIVizError(f"--resume carries on the saved run's own settings; drop {flags}")
    state = read_train_state(run)
    try:
        settings = settings_from_state(state, stop_step)
    except (TypeError, ValueError) as err:
        raise CLIVizError(f"cannot resume {run}: {err}") from None
    settings.num_workers = num_workers  # how many processes read the data never changes a batch
    if out.resolve() != run.resolve():
        check_output_folder(out, "--out folder")
    _run(settings, out, dev, save_dtype, state, overwrite=overwrite)


def _run(
    settings: TrainSettings,
    out: Path,
    dev: torch.device,
    save_dtype: torch.dtype | None,
    state: SavedState | None = None,
    overwrite: bool = False,
) -> None:
    """Train with a progress bar (loss, accuracy, tokens/s, ETA); the final line says where the model went."""

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from cliviz.train.run import run_training

    columns = (
        TextColumn("[bold]train[/] {task.fields[what]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn(
            "step {task.fields[step]} loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f} "
            "{task.fields[rate]:,.0f} tok/s"
        ),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    what = settings.fusion if settings.init_from is None else f"{settings.trainable} on {Path(settings.init_from).name}"
    main = Dist.from_env().main
    with Progress(*columns, console=Console(stderr=True), disable=not main) as progress:

        def on_start(trainer) -> None:
            if main:  # the run passed every check: now a schedule that cannot work is worth a warning
                _warn_schedule(settings)
            task = progress.add_task("train", total=1.0, what=what, step=trainer.step, loss=0.0, acc=0.0, rate=0.0)
            trainer.on_step = lambda r: progress.update(
                task, completed=r.fraction, step=r.step, loss=r.loss, acc=r.acc, rate=r.tokens_per_second
            )

        summary = run_training(
            settings, out, dev, resume=state, save_dtype=save_dtype, overwrite=overwrite, on_start=on_start
        )
    if main:
        seconds = summary.get("total_seconds", summary["seconds"])
        typer.echo(
            f"saved {what} model to {out} after {summary['steps']} steps ({seconds:.0f} s); "
            f"{summary['trainable_parameters']:,} trainable parameters"
        )
        from cliviz.data.loader import DataSummary

        typer.echo(DataSummary.from_dict(summary["data"]).describe())
