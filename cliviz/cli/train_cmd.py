"""`cliviz train`: a tiny model from scratch, or CLI's modules on a frozen checkpoint; resumable."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cliviz.cli.options import DeviceOpt, SeedOpt
from cliviz.errors import CLIVizError

if TYPE_CHECKING:
    import torch

    from cliviz.train import SavedState, TrainSettings


RESUME_KEEPS = {
    "out",
    "resume",
    "stop_step",
    "threads",
    "device",
    "save_dtype",
    "num_workers",
}  # all else: the saved run's
SAVE_DTYPES = ("float32", "bfloat16", "float16")
Opt = typer.Option


def train(
    ctx: typer.Context,
    out: Annotated[
        Path | None, Opt("--out", help="Folder for the trained model (with --resume: the run's folder unless given).")
    ] = None,
    init_from: Annotated[
        Path | None,
        Opt(
            "--init-from",
            help=(
                "Start from this model folder: a CLI model (e.g. from `cliviz attach`), a plain LLaVA / "
                "LLaVA-OneVision folder or a projector model (CLI is attached first). Default: a tiny model"
                " from scratch."
            ),
        ),
    ] = None,
    vision_from: Annotated[
        Path | None,
        Opt(
            "--vision-from",
            help=(
                "From scratch, but with the vision tower of this model folder (a stage-1 tower; freeze it "
                "with --train projector,llm)."
            ),
        ),
    ] = None,
    data: Annotated[
        Path | None,
        Opt(
            "--data",
            help=(
                "LLaVA-format JSON/JSONL (`{id, image, conversations}`), Parquet/Arrow files, or a "
                "ShapesVQA folder. Default: generated ShapesVQA scenes."
            ),
        ),
    ] = None,
    image_folder: Annotated[Path | None, Opt("--image-folder", help="Where the images named in --data live.")] = None,
    train_what: Annotated[
        str | None,
        Opt(
            "--train",
            help=(
                "all, or parts among cli,projector,llm,vision (e.g. cli or projector,llm). Default: all "
                "from scratch, cli with --init-from (everything else stays bit-identical), vision for "
                "--objective tower."
            ),
        ),
    ] = None,
    objective: Annotated[
        str,
        Opt(
            "--objective",
            help=(
                "answers (loss on answer tokens) | tower (stage 1 of the staged recipe: the vision tower "
                "alone on image-level scene targets)."
            ),
        ),
    ] = "answers",
    fusion: Annotated[
        str,
        Opt(
            "--fusion",
            help="cli | projector | shallow | deepstack (from scratch, or attached to a LLaVA/projector --init-from).",
        ),
    ] = "cli",
    steps: Annotated[int | None, Opt("--steps", help="Optimiser steps (reproducible budget).")] = None,
    minutes: Annotated[float | None, Opt("--minutes", help="Wall-clock budget instead of --steps.")] = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[
        int,
        Opt(
            "--batch-size",
            help="Samples per step and process (a ShapesVQA image with all its questions is one sample).",
        ),
    ] = 32,
    lr: Annotated[float, Opt("--lr", help="Peak learning rate.")] = 2e-3,
    alpha_lr: Annotated[
        float, Opt("--alpha-lr", help="Learning rate of the injection gates' alpha (no warmup: it must leave 0 first).")
    ] = 1e-2,
    warmup: Annotated[int, Opt("--warmup", min=1, help="Warmup steps.")] = 200,
    max_length: Annotated[
        int | None,
        Opt("--max-length", help="Tokens per conversation (longer ones are cut after their last whole answer)."),
    ] = None,
    num_workers: Annotated[int, Opt("--num-workers", min=0, help="DataLoader worker processes.")] = 0,
    gradient_checkpointing: Annotated[
        bool, Opt("--gradient-checkpointing", help="Recompute activations in backward (less memory).")
    ] = False,
    distributed: Annotated[
        str,
        Opt(
            "--distributed",
            help="Under torchrun: auto (=ddp) | ddp | fsdp (sharded, for models whose state does not fit one GPU).",
        ),
    ] = "auto",
    dtype: Annotated[
        str,
        Opt(
            "--dtype",
            help=(
                "Frozen base weights: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16; "
                "trained weights stay fp32, bf16 autocast on GPU."
            ),
        ),
    ] = "auto",
    log_every: Annotated[int, Opt("--log-every", min=1, help="Steps between lines of training_log.jsonl.")] = 25,
    threads: Annotated[int | None, Opt("--threads", help="CPU threads for torch.")] = None,
    data_offset: Annotated[
        int, Opt("--data-offset", min=0, help="First generated scene index (use new scenes when continuing).")
    ] = 0,
    stop_step: Annotated[
        int | None,
        Opt("--stop-step", min=1, help="Stop at this step of the --steps schedule (a resumable checkpoint partway)."),
    ] = None,
    resume: Annotated[
        Path | None,
        Opt(
            "--resume",
            help=(
                "Carry on an interrupted or --stop-step run exactly (weights, optimiser, RNG, data position"
                " from its train_state.safetensors)."
            ),
        ),
    ] = None,
    start_step: Annotated[
        int,
        Opt(
            "--start-step",
            min=0,
            help=(
                "Continue an older checkpoint without training state at this step (with --init-from): "
                "schedule and scenes carry on, optimiser starts fresh."
            ),
        ),
    ] = 0,
    position_aux: Annotated[
        bool,
        Opt(
            "--position-aux/--no-position-aux", help="Patch row/column and object-centre targets in the auxiliary loss."
        ),
    ] = True,
    extra_questions: Annotated[
        str, Opt("--extra-questions", help='More generated questions per image, "type:count,..." ("" for none).')
    ] = "relation:2,position:1",
    aux_layer: Annotated[
        int, Opt("--aux-layer", help="Vision hidden_states index of the auxiliary loss (-1: the last layer).")
    ] = -1,
    smooth_from: Annotated[
        int,
        Opt(
            "--smooth-from",
            help=(
                "--objective tower: pull the patch tokens of this vision layer and above toward their mean "
                "(the detail bottleneck of CLIP-like last layers)."
            ),
        ),
    ] = 4,
    smooth_weight: Annotated[
        float,
        Opt(
            "--smooth-weight",
            min=0.0,
            help="--objective tower: weight of that pull (0: the image-level objective alone).",
        ),
    ] = 1.0,
    scene_pool: Annotated[
        int | None,
        Opt("--scene-pool", min=1, help="Generated data: cycle over this many scenes (epochs over a fixed set)."),
    ] = None,
    cache_vision: Annotated[
        bool,
        Opt(
            "--cache-vision",
            help="Keep the frozen vision tower's states per sample (computed once; LLaVA, vision not trained).",
        ),
    ] = False,
    save_dtype: Annotated[
        str | None,
        Opt(
            "--save-dtype",
            help=(
                "float32 | bfloat16 | float16 for the saved model (default: the dtype the --init-from "
                "checkpoint is stored in; float32 from scratch)."
            ),
        ),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a tiny model from scratch, or CLI's modules on a frozen checkpoint (torchrun: DDP/FSDP)."""
    import torch

    from cliviz.runtime import resolve_device
    from cliviz.train import TrainSettings

    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise CLIVizError(f"unknown --save-dtype {save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    dev, _ = resolve_device(device, "float32")
    stored = getattr(torch, save_dtype) if save_dtype else None
    if resume is not None:
        _resume(ctx, resume, out or resume, stop_step, dev, stored, num_workers)
        return
    if out is None:
        raise CLIVizError("give --out FOLDER for the trained model")
    from cliviz.cli.preflight import check_output_folder

    check_output_folder(out, "--out folder")  # before any training: a typo must not cost a run
    if steps is not None and warmup >= steps:  # a run that never leaves warmup barely moves the gates
        typer.echo(f"warning: --warmup {warmup} >= --steps {steps}: the learning rate never reaches --lr", err=True)
    if steps is not None and log_every >= steps:
        typer.echo(
            f"warning: --log-every {log_every} >= --steps {steps}: training_log.jsonl gets at most one line "
            "(none when it exceeds --steps)",
            err=True,
        )
    _check_paths(init_from, data, image_folder, vision_from)
    settings = TrainSettings(
        fusion=fusion,
        init_from=str(init_from) if init_from else None,
        train=train_what,
        objective=objective,
        vision_from=str(vision_from) if vision_from else None,
        smooth_from=smooth_from,
        smooth_weight=smooth_weight,
        scene_pool=scene_pool,
        cache_vision=cache_vision,
        data=str(data) if data else None,
        image_folder=str(image_folder) if image_folder else None,
        max_length=max_length,
        num_workers=num_workers,
        data_offset=data_offset,
        extra_questions=extra_questions,
        seed=seed,
        steps=steps,
        minutes=minutes,
        batch_size=batch_size,
        lr=lr,
        alpha_lr=alpha_lr,
        warmup=warmup,
        start_step=start_step,
        stop_step=stop_step,
        position_aux=position_aux,
        aux_layer=aux_layer,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        distributed=distributed,
        log_every=log_every,
    )
    _check_settings(settings)
    _run(settings, out, dev, stored)


def _check_paths(
    init_from: Path | None, data: Path | None, image_folder: Path | None, vision_from: Path | None = None
) -> None:
    for option, folder in (("--init-from", init_from), ("--vision-from", vision_from)):
        if folder is not None and not (folder / "config.json").is_file():
            raise CLIVizError(f"{option} {folder} is not a model folder (no config.json)")
    if data is not None and not data.exists():
        raise CLIVizError(f"--data {data} not found")
    if image_folder is not None and not image_folder.is_dir():
        raise CLIVizError(f"--image-folder {image_folder} is not a folder")


def _check_settings(settings: TrainSettings) -> None:
    """One error line for inconsistent options, before any model is built."""
    from cliviz.data.questions import parse_extra_questions
    from cliviz.model.configuration import FUSIONS
    from cliviz.runtime import DTYPES
    from cliviz.train import VISION_LAYERS

    if settings.fusion not in FUSIONS:
        raise CLIVizError(f"unknown fusion {settings.fusion!r}; choose one of {', '.join(FUSIONS)}")
    if settings.dtype != "auto" and settings.dtype not in DTYPES:
        raise CLIVizError(f"unknown --dtype {settings.dtype!r}; use auto, float32, bfloat16 or float16")
    if settings.init_from is None and not -(VISION_LAYERS + 1) <= settings.aux_layer <= VISION_LAYERS:
        raise CLIVizError(
            f"--aux-layer {settings.aux_layer} is not a vision hidden_states index (0..{VISION_LAYERS}, "
            "or negative from the end)"
        )
    try:
        parse_extra_questions(settings.extra_questions)
        settings.check()
    except ValueError as err:
        raise CLIVizError(_as_options(str(err))) from None


def _as_options(message: str) -> str:
    """The settings speak in field names (`stop_step`); a command-line user typed `--stop-step`."""
    import re
    from dataclasses import fields

    from cliviz.train import TrainSettings

    for name in sorted((f.name for f in fields(TrainSettings) if "_" in f.name), key=len, reverse=True):
        message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
    return message.replace("steps or minutes", "--steps or --minutes")


def _resume(
    ctx: typer.Context,
    run: Path,
    out: Path,
    stop_step: int | None,
    dev: torch.device,
    save_dtype: torch.dtype | None,
    num_workers: int,
) -> None:
    """`--resume RUN`: the saved run's own settings, carried on from its state file."""
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
    _run(settings, out, dev, save_dtype, state)


def _run(
    settings: TrainSettings,
    out: Path,
    dev: torch.device,
    save_dtype: torch.dtype | None,
    state: SavedState | None = None,
) -> None:
    """Train with a progress bar (loss, accuracy, tokens/s, ETA); the final line says where the model went."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from cliviz.train import Trainer

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
    trainer = Trainer(settings, out, dev, resume=state, save_dtype=save_dtype)
    main = trainer.where.main
    with Progress(*columns, console=Console(stderr=True), disable=not main) as progress:
        task = progress.add_task("train", total=1.0, what=what, step=trainer.step, loss=0.0, acc=0.0, rate=0.0)
        trainer.on_step = lambda r: progress.update(
            task, completed=r.fraction, step=r.step, loss=r.loss, acc=r.acc, rate=r.tokens_per_second
        )
        summary = trainer.run()
    if main:
        seconds = summary.get("total_seconds", summary["seconds"])
        typer.echo(
            f"saved {what} model to {out} after {summary['steps']} steps ({seconds:.0f} s); "
            f"{summary['trainable_parameters']:,} trainable parameters"
        )
        from cliviz.data.loader import DataSummary

        typer.echo(DataSummary.from_dict(summary["data"]).describe())
