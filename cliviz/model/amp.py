"""AMP — Adaptive Multi-Projection.

Each selected vision layer k is normalised and mapped into the LLM space by the model's own
LLaVA projector `P` (shared across k) plus a per-layer low-rank correction:
`Vhat_k = P(norm_k(V_k)) + B_k A_k norm_k(V_k)`, `B_k` zero-initialised.
Sharing `P` keeps all layers in one comparable space; the LoRA lets each layer adapt cheaply.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRA(nn.Module):
    """Low-rank map `B A x`; `B` starts at zero so the correction starts at nothing."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class AMP(nn.Module):
    """Projects K vision layers into the LLM embedding space: `[B, N, Dv] x K -> [B, K, N, D]`."""

    def __init__(self, vision_hidden: int, text_hidden: int, n_layers: int, rank: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(vision_hidden) for _ in range(n_layers))
        self.loras = nn.ModuleList(LoRA(vision_hidden, text_hidden, rank) for _ in range(n_layers))

    def forward(self, layer_states: list[torch.Tensor], projector: nn.Module) -> torch.Tensor:
        projected = []
        for state, norm, lora in zip(layer_states, self.norms, self.loras):
            x = norm(state)  # [B, N, Dv]
            projected.append(projector(x) + lora(x))  # [B, N, D]
        return torch.stack(projected, dim=1)  # [B, K, N, D]
