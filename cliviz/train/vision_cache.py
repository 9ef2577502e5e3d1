"""Frozen vision states, computed once per image: what keeps training on a frozen tower affordable.

When the vision tower does not train, its hidden states for an image never change, so a run that
sees an image more than once (epochs over a fixed set, `--scene-pool`) can keep them. The model
then takes `vision_states` instead of `pixel_values` and runs only the projector, AMP and the LLM
(`CLIForConditionalGeneration.image_outputs_from_states`): exactly what the pixels would give.
Only the layers the model reads are kept (AMP's `vision_layers` and the projector's layer), in
float32 on the CPU: about 16 KB per layer for a bundled 64 px scene.
"""

from __future__ import annotations

import torch


class VisionCache:
    """Hidden states of the frozen tower per sample id, filled the first time a sample is seen."""

    def __init__(self, model) -> None:
        cfg = model.config
        n_states = cfg.base_config.vision_config.num_hidden_layers + 1
        self.model = model
        self.n_states = n_states
        read = {k % n_states for k in cfg.vision_layers} if model.amp is not None else set()  # AMP's layers
        self.layers = sorted(read | {cfg.base_config.vision_feature_layer % n_states})
        self.store: dict[str, list[torch.Tensor]] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def states(self, ids: list[str], pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The tower's hidden states of a batch (None at layers nobody reads), `[B, N+1, Dv]` each."""
        missing = [i for i, sample in enumerate(ids) if sample not in self.store]
        if missing:
            tower = self.model.base.model.vision_tower
            pixels = pixel_values[missing].to(self.model.dtype)
            hidden = tower(pixels, output_hidden_states=True).hidden_states
            for row, i in enumerate(missing):
                self.store[ids[i]] = [hidden[k][row].detach().float().cpu() for k in self.layers]
        self.misses += len(missing)
        self.hits += len(ids) - len(missing)
        device, dtype = pixel_values.device, self.model.dtype
        stacked = [
            torch.stack([self.store[sample][n] for sample in ids]).to(device, dtype) for n in range(len(self.layers))
        ]
        states: list[torch.Tensor | None] = [None] * self.n_states
        for k, value in zip(self.layers, stacked):
            states[k] = value
        return tuple(states)
