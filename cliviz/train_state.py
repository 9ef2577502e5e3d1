"""Exact resume for `cliviz train`: model, auxiliary heads, optimiser moments and RNG in one safetensors file.

A training run on this CPU takes hours and machines restart. `--init-from --start-step` can carry a
checkpoint on along the same schedule, but with fresh optimiser moments and aux heads, so the
continuation is not the run that would have happened. The state file holds everything the
training loop carries from one step to the next, as tensors plus JSON metadata: nothing is
pickled, and `train --resume RUN` continues the very same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from cliviz.atomic import atomic_write_bytes
from cliviz.errors import CLIVizError

STATE_FILE = "train_state.safetensors"
FORMAT = "cliviz-train-state/1"


@dataclass
class SavedState:
    """What `read_train_state` found: settings as saved, the step reached and the seconds spent."""

    run: Path
    settings: dict
    config: dict
    step: int
    seconds: float
    resumed_at: list[int]
    tensors: dict[str, torch.Tensor]
    param_groups: list[dict]

    def recent(self, name: str) -> list[float]:
        """The running window `name` ("loss" or "acc") as it stood at the saved step."""
        values = self.tensors.get(f"recent/{name}")
        return [] if values is None else values.tolist()


def write_train_state(
    out: Path, model: nn.Module, heads: nn.Module, opt: torch.optim.Optimizer,
    settings: dict, step: int, seconds: float, resumed_at: list[int], recent: dict[str, list[float]],
) -> None:
    """Write the full training state at `step` atomically (a crash keeps the previous state)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model", model), ("heads", heads)):
        for name, value in module.state_dict().items():
            tensors[f"{prefix}/{name}"] = value.detach().to("cpu").clone().contiguous()  # clone: no shared storage
    opt_state = opt.state_dict()
    for index, slots in opt_state["state"].items():
        for key, value in slots.items():
            tensors[f"opt/{index}/{key}"] = torch.as_tensor(value).detach().to("cpu").clone().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    for name, values in recent.items():  # the running loss/accuracy window the log and summary report
        tensors[f"recent/{name}"] = torch.tensor(values, dtype=torch.float64)
    metadata = {
        "format": FORMAT, "step": str(step), "seconds": str(seconds), "resumed_at": json.dumps(resumed_at),
        "settings": json.dumps(settings), "config": model.config.to_json_string(use_diff=False), "param_groups": json.dumps(opt_state["param_groups"]),
    }
    atomic_write_bytes(out / STATE_FILE, save(tensors, metadata=metadata), what="training state")


def read_train_state(run: Path) -> SavedState:
    """Read `run`'s training state; a missing, foreign or damaged file is a one-line CLIVizError."""
    path = run / STATE_FILE
    if not path.is_file():
        raise CLIVizError(f"{run} holds no {STATE_FILE} (only runs trained by this cliviz can be resumed exactly; "
                          "use --init-from with --start-step for older checkpoints)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT}")
        return SavedState(
            run=run, settings=json.loads(metadata["settings"]), config=json.loads(metadata["config"]), step=int(metadata["step"]), seconds=float(metadata["seconds"]),
            resumed_at=json.loads(metadata.get("resumed_at", "[]")), tensors=tensors,
            param_groups=json.loads(metadata["param_groups"]),
        )
    except (SafetensorError, ValueError, KeyError, OSError) as err:
        raise CLIVizError(f"cannot read training state {path}: {err}") from None


def restore(state: SavedState, model: nn.Module, heads: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Put the saved weights, optimiser moments and RNG back into freshly built objects."""
    for prefix, module in (("model", model), ("heads", heads)):
        weights = {k.removeprefix(prefix + "/"): v for k, v in state.tensors.items() if k.startswith(prefix + "/")}
        module.load_state_dict(weights, strict=True)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            slots.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": slots, "param_groups": state.param_groups})
    torch.set_rng_state(state.tensors["rng/torch"])

