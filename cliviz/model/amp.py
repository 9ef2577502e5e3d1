"""AMP — Adaptive Multi-Projection.

Each selected vision layer k is mapped into the LLM space by the model's own pretrained LLaVA
projector `P` (shared across k) plus a per-layer low-rank correction, as the paper writes it:
`Vhat_k = P(V_k) + B_k A_k V_k`, with `B_k` exactly zero at init, so every layer starts as the
projector's own reading of it. Sharing `P` keeps all layers in one comparable space; the LoRA lets
each layer adapt cheaply (rank r: `r (Dv + D)` parameters per layer).

Checkpoints written before this form had a LayerNorm per layer in front of `P`
(`Vhat_k = P(n_k(V_k)) + B_k A_k n_k(V_k)`); `CLIConfig.amp_norm` keeps them loading.
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
        # read by `CLIPreTrainedModel._init_weights`: post_init must not re-draw B
        self.up.zero_init = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class AMP(nn.Module):
    """Projects K vision layers into the LLM space: K x `[X, N, Dv]` -> `[X, K, N, D]`.

    X is the vision tower's batch: images for LLaVA, crops for LLaVA-OneVision (the model packs
    crops into images afterwards, exactly as the base packs its own image features).
    """

    def __init__(self, vision_hidden: int, text_hidden: int, n_layers: int, rank: int, norm: bool = False) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(vision_hidden) for _ in range(n_layers)) if norm else None
        self.loras = nn.ModuleList(LoRA(vision_hidden, text_hidden, rank) for _ in range(n_layers))

    def forward(self, layer_states: list[torch.Tensor], projector: nn.Module) -> torch.Tensor:
        if self.norms is not None:
            layer_states = [norm(state) for state, norm in zip(layer_states, self.norms)]
        stacked = torch.stack(layer_states, dim=1)  # [X, K, N, Dv]
        projected = projector(stacked)  # [X, K, N, D]: P is token-wise, one call for every layer
        corrections = torch.stack([lora(state) for state, lora in zip(layer_states, self.loras)], dim=1)  # [X, K, N, D]
        return projected + corrections
