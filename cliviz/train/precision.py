"""Mixed precision for `cliviz train`, decided once per run.

The frozen base is stored in the run's `--dtype` (bf16 on a GPU by default: half the memory); what
trains is kept in float32 (`select_trainable` casts it: the master weights the optimiser updates).
The two meet under `torch.autocast` in that same low dtype, on the CPU as on CUDA, so every matmul
sees one dtype (fp32 CLI weights times fp16 hidden states would otherwise fail, "expected m1 and m2
to have the same dtype") and the forward pass runs at the base's speed. float16 has 5 exponent bits:
small gradients underflow to zero, so a float16 run scales its loss with a `GradScaler` (dynamic,
steps with inf/nan gradients skipped); bfloat16 has float32's range and needs none.

The scaler's state (its scale and how many good steps since it last grew) is part of the run: a
resume that restarted it at 65536 would skip steps the uninterrupted run takes (or take ones it
skips), so `scaler_state` goes into the training state as plain JSON numbers and `load_scaler`
puts it back.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

LOW = (torch.bfloat16, torch.float16)
SCALER_FIELDS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


@dataclass
class Precision:
    """The run's compute dtype (None: plain float32) and, for float16, its loss scaler."""

    device_type: str
    compute: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self):
        """The forward pass's context: autocast to the compute dtype, or nothing in float32."""
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float = 1.0) -> bool:
        """Clip the (unscaled) gradients and step; False when a float16 step was skipped (inf/nan)."""
        if self.scaler is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
            return True
        self.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def scaler_state(self) -> dict[str, float | int] | None:
        """The loss scaler's state as plain numbers (JSON in the training state); None without one."""
        if self.scaler is None:
            return None
        state = self.scaler.state_dict()
        return {key: state[key] for key in SCALER_FIELDS}

    def load_scaler(self, state: dict[str, float | int] | None) -> bool:
        """Put a saved `scaler_state` back; False when this run scales its loss but `state` is None
        (a state written before the scale was saved, or by a run in another dtype): the scaler then
        starts afresh. A saved scale is ignored by a run without a scaler (bf16 or float32)."""
        if self.scaler is None:
            return True
        if state is None:
            return False
        self.scaler.load_state_dict(dict(state))
        return True


def check_scaler_state(state: object) -> None:
    """ValueError naming the first field of a saved `scaler_state` that no GradScaler could hold."""
    if not isinstance(state, dict) or set(state) != set(SCALER_FIELDS):
        raise ValueError(f"scaler is {str(state)[:80]}, expected a record of {', '.join(SCALER_FIELDS)}")
    for key in ("scale", "growth_factor", "backoff_factor"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"scaler {key} is {value!r}, expected a finite positive number")
    if not state["growth_factor"] > 1.0 > state["backoff_factor"]:
        raise ValueError("scaler growth_factor must exceed 1 and backoff_factor lie below 1")
    for key, lowest in (("growth_interval", 1), ("_growth_tracker", 0)):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"scaler {key} is {value!r}, expected a whole number from {lowest}")


def precision_for(base_dtype: torch.dtype, device: torch.device) -> Precision:
    """Autocast to the base's dtype when it is bf16/fp16 (CPU and CUDA alike); a scaler for fp16."""
    compute = base_dtype if base_dtype in LOW else None
    scaler = torch.amp.GradScaler(device.type) if compute is torch.float16 else None
    return Precision(device.type, compute, scaler)
