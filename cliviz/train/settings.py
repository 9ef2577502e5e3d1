"""`TrainSettings`: everything one training run is, in one JSON-able record (saved with its state).

Two jobs share them. From scratch (no `init_from`): a tiny model of `fusion` on generated
ShapesVQA scenes, every parameter trained, with the auxiliary patch loss. On a checkpoint
(`init_from`): a cliviz CLI folder — or a plain LLaVA / a projector model, which get CLI attached
first — trained on `data` with only the CLI modules by default (`train`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

PARTS = ("cli", "projector", "llm", "vision")  # `train` is "all" or a comma list of these ("cli+projector" also reads)
OBJECTIVES = ("answers", "tower")
DISTRIBUTED = ("auto", "ddp", "fsdp")


@dataclass
class TrainSettings:
    # what is trained
    fusion: str = "cli"  # the architecture from scratch; with a projector/LLaVA `init_from`, the fusion attached to it
    init_from: str | None = None  # a model folder to start from (None: a tiny model from scratch)
    vision_from: str | None = None  # from scratch: copy the vision tower of this model folder (a stage-1 tower)
    train: str | None = (
        None  # all, or parts "cli,projector,llm,vision"; None: all from scratch (and --start-step), else cli
    )
    objective: str = (
        "answers"  # answers: loss on the answer tokens; tower: stage-1 semantic pretraining of the vision tower
    )
    # data
    data: str | None = (
        None  # None: generated ShapesVQA scenes; else a LLaVA JSON/JSONL, Parquet/Arrow, or ShapesVQA folder
    )
    image_folder: str | None = None  # where the images a LLaVA-format file names live
    allow_absolute_image_paths: bool = False  # data that names images by absolute path (else: inside image_folder)
    max_length: int | None = None  # tokens per conversation (longer ones are cut after their last whole answer)
    num_workers: int = 0  # DataLoader worker processes
    shuffle_window: int = 1024  # rows shuffled together (streamed data)
    data_offset: int = 0  # first scene index of generated data, so that a continuation sees new scenes
    extra_questions: str = "relation:2,position:1"  # more generated questions per image, "type:count,..."
    scene_pool: int | None = None  # generated data: cycle over this many scenes (epochs over a fixed set)
    cache_vision: bool = False  # keep the frozen tower's states per sample (vision not trained; LLaVA only)
    # schedule
    seed: int = 0
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 32  # samples per step, per process
    lr: float = 2e-3
    alpha_lr: float = 1e-2  # the injection gates' tanh(alpha): own group, no warmup (see cliviz.train.setup)
    warmup: int = 200
    weight_decay: float = 0.01
    start_step: int = 0  # resume an older --steps checkpoint (no training state) at this step
    stop_step: int | None = None  # stop early on a --steps schedule (a checkpoint partway through it)
    # objective (generated ShapesVQA scenes with a trainable vision tower only)
    aux_weight: float = 0.5
    position_aux: bool = True  # row/column/object-centre targets in the auxiliary loss
    aux_layer: int = -1  # vision hidden_states index the auxiliary loss supervises (-1: the last layer)
    smooth_from: int = 4  # tower objective: patch tokens of this vision layer and above pulled toward their mean
    smooth_weight: float = 1.0
    # execution
    dtype: str = "auto"  # weights of the frozen base (auto: bf16 on a GPU, fp32 on CPU); trained ones stay fp32
    gradient_checkpointing: bool = False
    distributed: str = "auto"  # under torchrun: ddp, or fsdp (sharded; for models whose state does not fit one GPU)
    log_every: int = 25
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
        """ValueError naming the first inconsistent setting (the command turns it into one error line)."""
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give exactly one of steps or minutes")
        if (self.steps is not None and self.steps <= 0) or (self.minutes is not None and self.minutes <= 0):
            raise ValueError("steps/minutes must be positive")
        if self.train is not None:
            parts_of(self.train)  # raises on an unknown part
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.cache_vision and ("vision" in parts_of(self.trainable) or self.objective != "answers"):
            raise ValueError("cache_vision needs a frozen vision tower (train without the vision part)")
        if self.vision_from is not None and self.init_from is not None:
            raise ValueError("vision_from starts a tiny model from scratch: it does not go with init_from")
        if self.scene_pool is not None and self.scene_pool < 1:
            raise ValueError("scene_pool must be at least 1")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"unknown distributed mode {self.distributed!r}; choose one of {', '.join(DISTRIBUTED)}")
        if self.start_step and (self.steps is None or self.start_step >= self.steps or self.init_from is None):
            raise ValueError("start_step resumes a steps run: give init_from and a start_step below steps")
        if self.stop_step is not None and (self.steps is None or not self.start_step < self.stop_step <= self.steps):
            raise ValueError("stop_step needs steps and must lie after start_step and at most steps")
        for name in ("batch_size", "warmup", "log_every", "shuffle_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.lr <= 0 or self.alpha_lr < 0 or self.num_workers < 0:
            raise ValueError("lr must be positive, alpha_lr and num_workers not negative")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError("max_length must be at least 8 tokens")


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
