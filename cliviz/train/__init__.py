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

from importlib import import_module

# Imported on first use (PEP 562), so that `cliviz train --help` and the settings the command is built
# from load without torch and transformers.
_HOMES = {
    "StepReport": "loop",
    "Trainer": "loop",
    "settings_from_state": "loop",
    "train": "loop",
    "run_training": "run",
    "SUMMARY_FILE": "records",
    "earlier_log_rows": "records",
    "recorded_seed": "records",
    "PARTS": "settings",
    "TrainSettings": "settings",
    "lr_factor": "setup",
    "STATE_FILE": "state",
    "SavedState": "state",
    "read_train_state": "state",
    "VISION_LAYERS": "tiny",
    "tiny_config": "tiny",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'cliviz.train' has no attribute {name!r}")
    return getattr(import_module(f"cliviz.train.{_HOMES[name]}"), name)


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
