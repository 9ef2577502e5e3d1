"""Device and dtype choice shared by every command that runs a model."""

from __future__ import annotations

import torch

from cliviz.errors import CLIVizError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` picks CUDA when present with bf16, else CPU with fp32."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise CLIVizError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CLIVizError("--device cuda asked for, but no CUDA GPU is available here")
        if dev.type not in ("cpu", "cuda"):
            raise CLIVizError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise CLIVizError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dev, dt
