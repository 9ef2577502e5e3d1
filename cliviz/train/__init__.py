"""`cliviz train`: one trainer for the tiny models from scratch and for CLI on a frozen checkpoint.

- `settings`: `TrainSettings`, the whole run in one JSON-able record;
- `setup`: the starting model, what trains, the optimiser groups and schedule;
- `tiny`: the bundled tiny architecture and its auxiliary patch objective;
- `loop`: `Trainer` (build, step, checkpoint, finish) and `train`;
- `distributed`: torchrun, DDP and FSDP;
- `state`: exact resume from `train_state.safetensors`, the state checked before it is used;
- `saving`: finishing a model folder so that a kill or a full disk loses nothing;
- `run`: `run_training`, the guarded entry point (output folder rules, one writer per folder);
- `records`: the JSONL log, the summary and the model card.
"""

from cliviz.train.loop import StepReport, Trainer, settings_from_state, train
from cliviz.train.records import SUMMARY_FILE, earlier_log_rows, recorded_seed
from cliviz.train.run import run_training
from cliviz.train.settings import PARTS, TrainSettings
from cliviz.train.setup import lr_factor
from cliviz.train.state import STATE_FILE, SavedState, read_train_state
from cliviz.train.tiny import VISION_LAYERS, tiny_config

__all__ = [
    "PARTS",
    "STATE_FILE",
    "SUMMARY_FILE",
    "VISION_LAYERS",
    "SavedState",
    "StepReport",
    "TrainSettings",
    "Trainer",
    "earlier_log_rows",
    "lr_factor",
    "read_train_state",
    "recorded_seed",
    "run_training",
    "settings_from_state",
    "tiny_config",
    "train",
]
