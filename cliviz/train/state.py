"""Exact resume for `cliviz train`: trained weights, optimiser moments, RNG and the data position in
one safetensors file (`train_state.safetensors`), for both jobs (tiny from scratch, CLI on a base).

A run on this CPU takes hours and machines restart. The state file holds everything the training
loop carries from one step to the next, as tensors plus JSON metadata — nothing is pickled — so
`cliviz train --resume RUN` continues the very same run. Only the weights that train are stored:
a frozen base is rebuilt from `init_from` (its weights never change), so the state of CLI-only
training on a 7B base is megabytes, not gigabytes. Weights and optimiser state are gathered with
`torch.distributed.checkpoint.state_dict`, which serves a plain module, DDP and FSDP alike.
A float16 run's loss scaler is saved too (metadata `scaler`, JSON numbers); a state without it (an
older file) still resumes, its scaler starting afresh, with a warning that the run is no longer exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    DictValueType,
    StateDictOptions,
    ValueType,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cliviz.atomic import atomic_write_bytes, check_free_space
from cliviz.errors import CLIVizError

STATE_FILE = "train_state.safetensors"
FORMAT = "cliviz-train-state/2"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class SavedState:
    """What `read_train_state` found: settings as saved, the step reached and the seconds spent."""

    run: Path
    settings: dict
    config: dict
    step: int
    seconds: float
    resumed_at: list[int]
    data: dict  # DataSummary.to_dict() at the saved step (where the data stream resumes)
    tensors: dict[str, torch.Tensor]
    param_groups: list[dict]
    scaler: dict | None = None  # a float16 run's GradScaler state (Precision.scaler_state); None: none saved

    def recent(self, name: str) -> list[float]:
        """The running window `name` ("loss" or "acc") as it stood at the saved step."""
        values = self.tensors.get(f"recent/{name}")
        return [] if values is None else values.tolist()


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def trained_weights(trainee: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole and on the CPU (a collective under FSDP: call on every rank)."""
    out = {}
    for name, param in unwrap(trainee).named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            out[name] = value.detach().to("cpu").clone().contiguous()
    return out


def write_train_state(
    out: Path,
    trainee: nn.Module,
    opt: torch.optim.Optimizer,
    *,
    config_json: str,
    settings: dict,
    step: int,
    seconds: float,
    resumed_at: list[int],
    recent: dict[str, list[float]],
    data: dict,
    main: bool = True,
    scaler: dict | None = None,
) -> None:
    """Write the full training state at `step` atomically (a crash keeps the previous state).

    A collective under DDP/FSDP (every process gathers); only the main process writes. `scaler`: the
    float16 loss scaler's state (`Precision.scaler_state`), kept as JSON metadata."""
    tensors = {f"model/{k}": v for k, v in trained_weights(trainee).items()}
    opt_state = get_optimizer_state_dict(unwrap(trainee), opt, options=_FULL)
    if not main:
        return
    # "state" maps each parameter to its slots (torch types the key's value as either form)
    for fqn, slots in cast("dict[str, DictValueType]", opt_state["state"]).items():
        for key, value in slots.items():
            tensors[f"opt/{fqn}/{key}"] = torch.as_tensor(value).detach().to("cpu").clone().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    for name, values in recent.items():  # the running loss/accuracy window the log and summary report
        tensors[f"recent/{name}"] = torch.tensor(values, dtype=torch.float64)
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "seconds": str(seconds),
        "resumed_at": json.dumps(resumed_at),
        "settings": json.dumps(settings),
        "config": config_json,
        "data": json.dumps(data),
        "param_groups": json.dumps(opt_state["param_groups"]),
    }
    if scaler is not None:
        metadata["scaler"] = json.dumps(scaler)
    blob = save(tensors, metadata=metadata)
    check_free_space(out, len(blob), "training state")
    atomic_write_bytes(out / STATE_FILE, blob, what="training state")


def read_train_state(run: Path) -> SavedState:
    """Read `run`'s training state; a missing, foreign or damaged file is a one-line CLIVizError."""
    path = run / STATE_FILE
    if not path.is_file():
        raise CLIVizError(
            f"{run} holds no {STATE_FILE} (only runs trained by this cliviz can be resumed exactly; "
            "use --init-from with --start-step for older checkpoints)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT}")
        state = SavedState(
            run=run,
            settings=json.loads(metadata["settings"]),
            config=json.loads(metadata["config"]),
            step=int(metadata["step"]),
            seconds=float(metadata["seconds"]),
            resumed_at=json.loads(metadata.get("resumed_at", "[]")),
            data=json.loads(metadata["data"]),
            tensors=tensors,
            param_groups=json.loads(metadata["param_groups"]),
            scaler=json.loads(metadata["scaler"]) if "scaler" in metadata else None,
        )
        check_metadata(state)
        return state
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, RecursionError) as err:
        raise CLIVizError(f"cannot read training state {path}: {err}") from None


def _count(value: object, name: str, upper: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (upper is not None and value > upper):
        limit = f" up to {upper}" if upper is not None else ""
        raise ValueError(f"{name} is {value!r}, expected a whole number from 0{limit}")
    return value


def check_metadata(state: SavedState) -> None:
    """ValueError naming the first field of the state's metadata that no run could have written:
    the settings go through the command line's own validation, counts are whole and in range."""
    from cliviz.train.precision import check_scaler_state
    from cliviz.train.settings import TrainSettings

    if not isinstance(state.settings, dict):
        raise ValueError("settings are not a record")
    settings = TrainSettings.from_dict(state.settings)  # types checked field by field
    settings.check()
    _count(state.step, "step", settings.steps)
    if not math.isfinite(state.seconds) or state.seconds < 0:
        raise ValueError(f"seconds is {state.seconds!r}")
    if not isinstance(state.resumed_at, list):
        raise ValueError("resumed_at is not a list")
    for step in state.resumed_at:
        _count(step, "a resumed_at step", state.step)
    if not isinstance(state.config, dict):
        raise ValueError("config is not a record")
    if not isinstance(state.data, dict):
        raise ValueError("data is not a record")
    _count(state.data.get("next_batch"), "data.next_batch")
    for name in ("batches", "samples", "tokens", "label_tokens", "truncated"):
        _count(state.data.get(name, 0), f"data.{name}")
    skipped = state.data.get("skipped", {})
    if not isinstance(skipped, dict):
        raise ValueError("data.skipped is not a record")
    for reason, count in skipped.items():
        _count(count, f"data.skipped.{reason}")
    groups = state.param_groups
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"param_groups is {str(groups)[:60]}, expected a non-empty list of records")
    for group in groups:
        for key in ("lr", "weight_decay"):
            if key in group and (not isinstance(group[key], (int, float)) or not math.isfinite(group[key])):
                raise ValueError(f"param_groups {key} is {group[key]!r}")
    rng = state.tensors.get("rng/torch")
    reference = torch.get_rng_state()
    if rng is None or rng.dtype != reference.dtype or rng.shape != reference.shape:
        raise ValueError("rng/torch is not a torch RNG state (uint8, as torch.get_rng_state() gives)")
    for name in ("loss", "acc"):
        values = state.tensors.get(f"recent/{name}")
        if values is not None and (values.dim() != 1 or not values.is_floating_point()):
            raise ValueError(f"recent/{name} is not a list of numbers")
    if state.scaler is not None:
        check_scaler_state(state.scaler)


def check_tensors(state: SavedState, module: nn.Module) -> None:
    """CLIVizError unless every saved weight and optimiser moment has its parameter's shape, a floating
    dtype and finite values: a state checked like a model folder before anything is loaded from it."""
    params = dict(module.named_parameters())
    for key, value in state.tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            name, slot = rest, "weight"
        elif kind == "opt":
            name, _, slot = rest.rpartition("/")
        else:
            continue
        param = params.get(name)
        if param is None:
            continue  # names are matched separately (missing / extra)
        shape = tuple(param.full_tensor().shape if hasattr(param, "full_tensor") else param.shape)
        if slot == "step":
            if value.numel() != 1 or not torch.isfinite(value.float()).all() or float(value) < 0:
                raise CLIVizError(f"the training state of {state.run} has a bad optimiser step count for {name}")
            continue
        if tuple(value.shape) != shape:
            raise CLIVizError(
                f"the training state of {state.run} does not match this model: {key} has shape "
                f"{tuple(value.shape)}, the model's {name} {shape}"
            )
        if not value.is_floating_point():
            raise CLIVizError(f"the training state of {state.run} holds {key} as {value.dtype}, not floating point")
        if not torch.isfinite(value).all():
            raise CLIVizError(f"the training state of {state.run} holds non-finite values in {key} (NaN or inf)")


def restore(state: SavedState, trainee: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Put the saved weights, optimiser moments and RNG back into freshly built objects."""
    module = unwrap(trainee)
    weights: dict[str, ValueType] = {
        k.removeprefix("model/"): v for k, v in state.tensors.items() if k.startswith("model/")
    }
    wanted = {name for name, p in module.named_parameters() if p.requires_grad}
    if set(weights) != wanted:
        missing, extra = sorted(wanted - set(weights))[:3], sorted(set(weights) - wanted)[:3]
        raise CLIVizError(
            f"the training state of {state.run} does not match this model (missing {missing}, extra {extra})"
        )
    check_tensors(state, module)
    if len(state.param_groups) != len(opt.param_groups):
        raise CLIVizError(
            f"the training state of {state.run} has {len(state.param_groups)} optimiser groups, this run "
            f"{len(opt.param_groups)}"
        )
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    slots: dict[str, DictValueType] = {}
    for key, value in state.tensors.items():
        if key.startswith("opt/"):
            fqn, name = key.removeprefix("opt/").rsplit("/", 1)
            slots.setdefault(fqn, {})[name] = value
    # strict=False: a parameter that never received a gradient (e.g. a vision layer the loss does
    # not reach) has no optimiser state to save, and needs none back
    try:
        set_optimizer_state_dict(
            module,
            opt,
            # a record of records: torch's ValueType admits one only as dict[str, ValueType] (dict is invariant)
            {"state": cast(DictValueType, slots), "param_groups": state.param_groups},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CLIVizError(f"the optimiser state of {state.run} does not fit this run: {err}") from None
    torch.set_rng_state(state.tensors["rng/torch"])
