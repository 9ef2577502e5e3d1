"""Mixed precision for `cliviz train`, decided once per run.

The frozen base is stored in the run's `--dtype` (bf16 on a GPU by default: half the memory); what
trains is kept in float32 (`select_trainable` casts it: the master weights the optimiser updates).
The two meet under `torch.autocast` in that same low dtype, on the CPU as on CUDA, so every matmul
sees one dtype (fp32 CLI weights times fp16 hidden states would otherwise fail, "expected m1 and m2
to have the same dtype") and the forward pass runs at the base's speed. float16 has 5 exponent bits:
small gradients underflow to zero, so a float16 run scales its loss with a `GradScaler` (dynamic,
steps with inf/nan gradients skipped); bfloat16 has float32's range and needs none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

LOW = (torch.bfloat16, torch.float16)


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


def precision_for(base_dtype: torch.dtype, device: torch.device) -> Precision:
    """Autocast to the base's dtype when it is bf16/fp16 (CPU and CUDA alike); a scaler for fp16."""
    compute = base_dtype if base_dtype in LOW else None
    scaler = torch.amp.GradScaler(device.type) if compute is torch.float16 else None
    return Precision(device.type, compute, scaler)
