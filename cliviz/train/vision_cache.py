"""Frozen vision states, computed once per image: what keeps training on a frozen tower affordable.

When the vision tower does not train, its hidden states for an image never change, so a run that
sees an image more than once (epochs over a fixed set, `--scene-pool`) can keep them. The model
then takes `vision_states` instead of `pixel_values` and runs only the projector, AMP and the LLM
(`CLIForConditionalGeneration.image_outputs_from_states`): exactly what the pixels would give.
Only the layers the model reads are kept (AMP's `vision_layers` and the projector's layer), on the
CPU in the tower's own dtype (exactly what it computed): about 16 KB per layer for a bundled 64 px
scene, but ~30 MB per LLaVA-1.5 image in bf16 with every layer read. So the cache is bounded: least
recently used samples are dropped once it holds `max_bytes` (default: a quarter of the host's free
memory, at most 8 GB), and a dropped sample is simply computed again when it comes back.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

MAX_DEFAULT_BYTES = 8 * 2**30


class VisionCache:
    """Hidden states of the frozen tower per sample id, filled the first time a sample is seen."""

    def __init__(self, model, max_bytes: int | None = None) -> None:
        cfg = model.config
        n_states = cfg.base_config.vision_config.num_hidden_layers + 1
        self.model = model
        self.n_states = n_states
        read = {k % n_states for k in cfg.vision_layers} if model.amp is not None else set()  # AMP's layers
        self.layers = sorted(read | {cfg.base_config.vision_feature_layer % n_states})
        self.store: OrderedDict[str, list[torch.Tensor]] = OrderedDict()  # least recently used first
        self.bytes = 0
        if max_bytes is None:
            from cliviz.memory import free_memory_bytes

            max_bytes = min(MAX_DEFAULT_BYTES, free_memory_bytes("cpu") // 4)
        self.max_bytes = max_bytes
        self.hits = self.misses = self.evicted = 0

    @torch.no_grad()
    def states(self, ids: list[str], pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The tower's hidden states of a batch (None at layers nobody reads), `[B, N+1, Dv]` each."""
        missing = [i for i, sample in enumerate(ids) if sample not in self.store]
        if missing:
            tower = self.model.base.model.vision_tower
            pixels = pixel_values[missing].to(self.model.dtype)
            hidden = tower(pixels, output_hidden_states=True).hidden_states
            fresh = {
                ids[i]: [hidden[k][row].detach().cpu().clone() for k in self.layers] for row, i in enumerate(missing)
            }
        else:
            fresh = {}
        self.misses += len(missing)
        self.hits += len(ids) - len(missing)
        rows = [fresh[sample] if sample in fresh else self.store[sample] for sample in ids]
        for sample in ids:
            if sample in self.store:
                self.store.move_to_end(sample)
        for sample, kept in fresh.items():
            self._keep(sample, kept)
        device, dtype = pixel_values.device, self.model.dtype
        stacked = [torch.stack([row[n] for row in rows]).to(device, dtype) for n in range(len(self.layers))]
        states: list[torch.Tensor | None] = [None] * self.n_states
        for k, value in zip(self.layers, stacked):
            states[k] = value
        return tuple(states)

    def _keep(self, sample: str, states: list[torch.Tensor]) -> None:
        """Store `sample`, dropping the least recently used ones beyond `max_bytes`."""
        size = sum(t.numel() * t.element_size() for t in states)
        if size > self.max_bytes:
            return
        self.store[sample] = states
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.store.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in dropped)
            self.evicted += 1
