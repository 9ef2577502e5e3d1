"""Exact resume for `cliviz train`: trained weights, optimiser moments, RNG and the data position in
one safetensors file (`train_state.safetensors`), for both jobs (tiny from scratch, CLI on a base).

A run on this CPU takes hours and machines restart. The state file holds everything the training
loop carries from one step to the next, as tensors plus JSON metadata — nothing is pickled — so
`cliviz train --resume RUN` continues the very same run. Only the weights that train are stored:
a frozen base is rebuilt from `init_from` (its weights never change), so the state of CLI-only
training on a 7B base is megabytes, not gigabytes. Weights and optimiser state are gathered with
`torch.distributed.checkpoint.state_dict`, which serves a plain module, DDP and FSDP alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cliviz.atomic import atomic_write_bytes
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
) -> None:
    """Write the full training state at `step` atomically (a crash keeps the previous state).

    A collective under DDP/FSDP (every process gathers); only the main process writes."""
    tensors = {f"model/{k}": v for k, v in trained_weights(trainee).items()}
    opt_state = get_optimizer_state_dict(unwrap(trainee), opt, options=_FULL)
    if not main:
        return
    for fqn, slots in opt_state["state"].items():
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
    atomic_write_bytes(out / STATE_FILE, save(tensors, metadata=metadata), what="training state")


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
        return SavedState(
            run=run,
            settings=json.loads(metadata["settings"]),
            config=json.loads(metadata["config"]),
            step=int(metadata["step"]),
            seconds=float(metadata["seconds"]),
            resumed_at=json.loads(metadata.get("resumed_at", "[]")),
            data=json.loads(metadata["data"]),
            tensors=tensors,
            param_groups=json.loads(metadata["param_groups"]),
        )
    except (SafetensorError, ValueError, KeyError, OSError) as err:
        raise CLIVizError(f"cannot read training state {path}: {err}") from None


def restore(state: SavedState, trainee: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Put the saved weights, optimiser moments and RNG back into freshly built objects."""
    module = unwrap(trainee)
    weights = {k.removeprefix("model/"): v for k, v in state.tensors.items() if k.startswith("model/")}
    wanted = {name for name, p in module.named_parameters() if p.requires_grad}
    if set(weights) != wanted:
        missing, extra = sorted(wanted - set(weights))[:3], sorted(set(weights) - wanted)[:3]
        raise CLIVizError(
            f"the training state of {state.run} does not match this model (missing {missing}, extra {extra})"
        )
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    slots: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.tensors.items():
        if key.startswith("opt/"):
            fqn, name = key.removeprefix("opt/").rsplit("/", 1)
            slots.setdefault(fqn, {})[name] = value
    # strict=False: a parameter that never received a gradient (e.g. a vision layer the loss does
    # not reach) has no optimiser state to save, and needs none back
    set_optimizer_state_dict(
        module,
        opt,
        {"state": slots, "param_groups": state.param_groups},
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    torch.set_rng_state(state.tensors["rng/torch"])
