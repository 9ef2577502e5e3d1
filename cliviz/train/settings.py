"""`TrainSettings`: everything one training run is, in one JSON-able record (saved with its state).

Two jobs share them. From scratch (no `init_from`): a tiny model of `fusion` on generated
ShapesVQA scenes, every parameter trained, with the auxiliary patch loss. On a checkpoint
(`init_from`): a cliviz CLI folder — or a plain LLaVA / a projector model, which get CLI attached
first — trained on `data` with only the CLI modules by default (`train`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PARTS = ("cli", "projector", "llm", "vision")  # `train` is "all" or a comma list of these ("cli+projector" also reads)
OBJECTIVES = ("answers", "tower")
DISTRIBUTED = ("auto", "ddp", "fsdp")


def option(default: Any, flag: str, help: str, **typer: Any) -> Any:
    """A setting that is also a `cliviz train` option: its flag, help and typer extras live here, once."""
    return field(default=default, metadata={"flag": flag, "help": help, "typer": typer})


class SettingError(ValueError):
    """A bad setting. The message names settings as `{field}` placeholders: `str(err)` reads them as
    field names (Python), `err.for_command_line()` as the flags a command-line user typed."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self._render(lambda name: name))

    def _render(self, name_of) -> str:
        names = {f.name: name_of(f.name) for f in fields(TrainSettings)}
        return self.template.format(**names, **self.values)

    def for_command_line(self) -> str:
        return self._render(lambda name: flag_of(name))


def flag_of(name: str) -> str:
    """`stop_step` -> `--stop-step` (the first form of a `--x/--no-x` pair)."""
    meta: Mapping[str, Any] = next((f.metadata for f in fields(TrainSettings) if f.name == name), {})
    return meta.get("flag", "--" + name.replace("_", "-")).split("/")[0]


@dataclass
class TrainSettings:
    # what is trained
    fusion: str = option(
        "cli",
        "--fusion",
        "cli | projector | shallow | deepstack (from scratch, or attached to a LLaVA/projector --init-from).",
    )
    init_from: str | None = option(
        None,
        "--init-from",
        "Start from this model folder: a CLI model (e.g. from `cliviz attach`), a plain LLaVA / LLaVA-OneVision folder "
        "or a projector model (CLI is attached first). Default: a tiny model from scratch.",
    )
    vision_from: str | None = option(
        None,
        "--vision-from",
        "From scratch, but with the vision tower of this model folder (a stage-1 tower; freeze it with --train "
        "projector,llm).",
    )
    train: str | None = option(
        None,
        "--train",
        "all, or parts among cli,projector,llm,vision (e.g. cli or projector,llm). Default: all from scratch, cli with "
        "--init-from (everything else stays bit-identical), vision for --objective tower.",
    )
    objective: str = option(
        "answers",
        "--objective",
        "answers (loss on answer tokens) | tower (stage 1 of the staged recipe: the vision tower alone on image-level "
        "scene targets).",
    )
    # data
    data: str | None = option(
        None,
        "--data",
        "LLaVA-format JSON/JSONL (`{id, image, conversations}`), Parquet/Arrow files, or a ShapesVQA folder. Default: "
        "generated ShapesVQA scenes.",
    )
    image_folder: str | None = option(None, "--image-folder", "Where the images named in --data live.")
    allow_absolute_image_paths: bool = option(
        False,
        "--allow-absolute-image-paths",
        "Read images that --data names by absolute path (off: every image must lie inside --image-folder).",
    )
    max_length: int | None = option(
        None,
        "--max-length",
        "Tokens per conversation (longer ones are cut after their last whole answer). Default: the model's context.",
    )
    num_workers: int = option(0, "--num-workers", "DataLoader worker processes.", min=0)
    shuffle_window: int = 1024  # rows shuffled together (streamed data)
    data_offset: int = option(
        0, "--data-offset", "First generated scene index (use new scenes when continuing).", min=0
    )
    extra_questions: str = option(
        "relation:2,position:1",
        "--extra-questions",
        'More generated questions per image, "type:count,..." ("" for none).',
    )
    scene_pool: int | None = option(
        None, "--scene-pool", "Generated data: cycle over this many scenes (epochs over a fixed set).", min=1
    )
    cache_vision: bool = option(
        False,
        "--cache-vision",
        "Keep the frozen vision tower's states per sample (computed once; LLaVA, vision not trained).",
    )
    # schedule
    seed: int = option(0, "--seed", "Random seed.")
    steps: int | None = option(None, "--steps", "Optimiser steps (reproducible budget).")
    minutes: float | None = option(None, "--minutes", "Wall-clock budget instead of --steps.")
    batch_size: int = option(
        32, "--batch-size", "Samples per step and process (a ShapesVQA image with all its questions is one sample)."
    )
    grad_accum: int = option(
        1,
        "--grad-accum",
        "Micro-batches of --batch-size per optimiser step (gradients accumulated: the same step as one batch of "
        "N x --batch-size, in the memory of one micro-batch).",
        min=1,
    )
    lr: float = option(2e-3, "--lr", "Peak learning rate.")
    alpha_lr: float = option(
        1e-2, "--alpha-lr", "Learning rate of the injection gates' alpha (no warmup: it must leave 0 first)."
    )  # own group, no warmup (see cliviz.train.setup)
    warmup: int = option(200, "--warmup", "Warmup steps.", min=1)
    weight_decay: float = 0.01
    start_step: int = option(
        0,
        "--start-step",
        "Continue an older checkpoint without training state at this step (with --init-from): schedule and scenes "
        "carry on, optimiser starts fresh.",
        min=0,
    )
    stop_step: int | None = option(
        None, "--stop-step", "Stop at this step of the --steps schedule (a resumable checkpoint partway).", min=1
    )
    # objective (generated ShapesVQA scenes with a trainable vision tower only)
    aux_weight: float = 0.5
    position_aux: bool = option(
        True, "--position-aux/--no-position-aux", "Patch row/column and object-centre targets in the auxiliary loss."
    )
    aux_layer: int = option(-1, "--aux-layer", "Vision hidden_states index of the auxiliary loss (-1: the last layer).")
    smooth_from: int = option(
        4,
        "--smooth-from",
        "--objective tower: pull the patch tokens of this vision layer and above toward their mean (the detail "
        "bottleneck of CLIP-like last layers).",
    )
    smooth_weight: float = option(
        1.0, "--smooth-weight", "--objective tower: weight of that pull (0: the image-level objective alone).", min=0.0
    )
    # execution
    dtype: str = option(
        "auto",
        "--dtype",
        "Frozen base weights and compute: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16; trained "
        "weights stay fp32 under autocast (CPU and GPU), float16 with a loss scaler.",
    )
    gradient_checkpointing: bool = option(
        False, "--gradient-checkpointing", "Recompute activations in backward (less memory)."
    )
    distributed: str = option(
        "auto",
        "--distributed",
        "Under torchrun: auto (=ddp) | ddp | fsdp (sharded, for models whose state does not fit one GPU).",
    )
    log_every: int = option(25, "--log-every", "Steps between lines of training_log.jsonl.", min=1)
    checkpoint_minutes: float = 5.0

    @property
    def trainable(self) -> str:
        if self.train is not None:
            return self.train
        if self.objective == "tower":
            return "vision"
        return "all" if self.init_from is None or self.start_step else "cli"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainSettings:
        """A saved run's settings; keys of older versions that no longer exist are dropped, and a value
        of the wrong type (a hand-edited or damaged state) is a ValueError naming the field."""
        known = {f.name: f.type for f in fields(cls)}
        kept = {k: v for k, v in saved.items() if k in known}
        for name, value in kept.items():
            if not _has_type(value, str(known[name])):
                raise ValueError(f"setting {name} is {value!r}, expected {known[name]}")
        return cls(**kept)

    def check(self) -> None:
        """SettingError naming the first inconsistent setting: every check of a run, the command line's
        included, before any model is built."""
        from cliviz.data.questions import parse_extra_questions
        from cliviz.model.configuration import FUSIONS
        from cliviz.runtime import DTYPES

        if self.fusion not in FUSIONS:
            raise SettingError(
                "unknown {fusion} {value!r}; choose one of {choices}", value=self.fusion, choices=", ".join(FUSIONS)
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SettingError("unknown {dtype} {value!r}; use auto, float32, bfloat16 or float16", value=self.dtype)
        if (self.steps is None) == (self.minutes is None):
            raise SettingError("give exactly one of {steps} or {minutes}")
        if (self.steps is not None and self.steps <= 0) or (self.minutes is not None and self.minutes <= 0):
            raise SettingError("{steps}/{minutes} must be positive")
        if self.train is not None:
            try:
                parts_of(self.train)
            except ValueError as err:
                raise SettingError("{train}: " + str(err).replace("{", "{{").replace("}", "}}")) from None
        if self.objective not in OBJECTIVES:
            raise SettingError(
                "unknown {objective} {value!r}; choose one of {choices}",
                value=self.objective,
                choices=", ".join(OBJECTIVES),
            )
        if self.cache_vision and ("vision" in parts_of(self.trainable) or self.objective != "answers"):
            raise SettingError("{cache_vision} needs a frozen vision tower (train without the vision part)")
        if self.vision_from is not None and self.init_from is not None:
            raise SettingError("{vision_from} starts a tiny model from scratch: it does not go with {init_from}")
        if self.scene_pool is not None and self.scene_pool < 1:
            raise SettingError("{scene_pool} must be at least 1")
        if self.distributed not in DISTRIBUTED:
            raise SettingError(
                "unknown distributed mode {value!r} ({distributed}); choose one of {choices}",
                value=self.distributed,
                choices=", ".join(DISTRIBUTED),
            )
        if self.start_step and (self.steps is None or self.start_step >= self.steps or self.init_from is None):
            raise SettingError("{start_step} resumes a steps run: give {init_from} and a {start_step} below {steps}")
        if self.stop_step is not None and (self.steps is None or not self.start_step < self.stop_step <= self.steps):
            raise SettingError("{stop_step} needs {steps} and must lie after {start_step} and at most {steps}")
        for name in ("batch_size", "grad_accum", "warmup", "log_every", "shuffle_window"):
            if getattr(self, name) < 1:
                raise SettingError("{" + name + "} must be at least 1")
        if self.lr <= 0 or self.alpha_lr < 0 or self.num_workers < 0:
            raise SettingError("{lr} must be positive, {alpha_lr} and {num_workers} not negative")
        if self.max_length is not None and self.max_length < 8:
            raise SettingError("{max_length} must be at least 8 tokens")
        if self.init_from is None:
            from cliviz.train.tiny import VISION_LAYERS

            if not -(VISION_LAYERS + 1) <= self.aux_layer <= VISION_LAYERS:
                raise SettingError(
                    "{aux_layer} {value} is not a vision hidden_states index (0..{top}, or negative from the end)",
                    value=self.aux_layer,
                    top=VISION_LAYERS,
                )
        try:
            parse_extra_questions(self.extra_questions)
        except ValueError as err:
            raise SettingError("{extra_questions}: " + str(err).replace("{", "{{").replace("}", "}}")) from None


def command_line_fields() -> list:
    """The settings that are `cliviz train` options, in declaration order (the command's signature)."""
    return [f for f in fields(TrainSettings) if "flag" in f.metadata]


def parts_of(train: str) -> set[str]:
    """`"all"` or a comma/plus list of PARTS -> the set of parts; ValueError naming an unknown one."""
    if train == "all":
        return set(PARTS)
    parts = {p.strip() for p in train.replace("+", ",").split(",") if p.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown or not parts:
        raise ValueError(
            f"unknown train choice {train!r}; give all, or parts among {', '.join(PARTS)} (e.g. cli,projector)"
        )
    return parts


def _has_type(value: object, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated `int`, `float | None`, `str`, `bool`..."""
    allowed = {part.strip() for part in annotation.split("|")}
    if value is None:
        return "None" in allowed
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, int):
        return bool(allowed & {"int", "float"})
    if isinstance(value, float):
        return "float" in allowed and value == value and abs(value) != float("inf")
    return isinstance(value, str) and "str" in allowed
