"""AGF — Adaptive Gating Fusion, one instance per injection layer.

For each token t with hidden state h_t at the input of LLM layer i:
1. `VisionRead`: a multi-head read distils every vision layer k of the visual memory,
   `c_{t,k} = Attn(Q_i norm(h_t), keys_k, values_k)`, r channels wide (`config.read_width`);
2. `Gate`: `g_{i,t} = softmax(W_g norm(h_t) / tau)` over the K vision layers — **the hook point**
   every analysis in cliviz reads or overrides (`agf.<j>.gate`, output `[batch, seq, K]`);
3. `Injection`: `tanh(alpha_i) W_o sum_k g_{t,k} c_{t,k}` is added to the residual stream
   (`agf.<j>.injection`, output `[batch, seq, D]`). `alpha_i = 0` at init: a freshly attached
   model equals its base.

The keys and values of the memory do not depend on the token, so they are computed once per
image at prefill and reused by every decode step. In the light read (docs/design.md §1) one
`MemoryKeysValues` (D -> r) serves every injection layer; only the query (D -> r) and the output
map (r -> D) belong to a layer. The full read of the first design has D-wide maps of its own per
layer (`VisionRead(own_keys_values=True)`), kept for checkpoints written with it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Gate(nn.Module):
    """Softmax weights over the K vision layers for every token: `[B, T, D] -> [B, T, K]`.

    `to_logits` is its own module so that the pre-softmax logits are a hook point too.
    """

    def __init__(self, hidden: int, n_vision: int, temperature: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.to_logits = nn.Linear(hidden, n_vision)
        self.temperature = temperature

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.to_logits(self.norm(hidden))  # [B, T, K]
        return torch.softmax(logits.float() / self.temperature, dim=-1).to(hidden.dtype)


class StaticGate(nn.Module):
    """One-hot gate of the static one-to-one (`shallow`) or ungated (`deepstack`) wiring."""

    def __init__(self, n_vision: int, index: int) -> None:
        super().__init__()
        # Plain ints, not a buffer: from_pretrained builds modules on the meta device and would
        # leave an unsaved buffer uninitialised.
        self.n_vision = n_vision
        self.index = index

    @property
    def weights(self) -> torch.Tensor:
        return F.one_hot(torch.tensor(self.index), self.n_vision).float()  # [K]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weights.to(hidden.device, hidden.dtype).expand(*hidden.shape[:-1], -1)  # [B, T, K]


def fold_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, K, N, r] -> [B, K*H, N, r/H]`: vision layers and heads folded into one batch axis, because
    SDPA's fused kernels take 4-D inputs only (a 5-D call falls back to the unfused math path)."""
    b, k, n, r = x.shape
    return x.view(b, k, n, heads, r // heads).transpose(2, 3).reshape(b, k * heads, n, r // heads)


def pool_memory(
    memory: torch.Tensor, mask: torch.Tensor | None, max_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average neighbouring memory positions so that no image has more than `max_tokens`.

    `memory [B, K, N, D]`, `mask [B, N]` (True at real positions; None: all real). Each image is
    pooled on its own real positions (adaptive average pooling over the token axis), so a batch
    pools exactly as its samples would alone. Keys and values are linear in the memory, so pooling
    the memory equals pooling them.
    """
    lengths = [memory.shape[2]] * memory.shape[0] if mask is None else mask.sum(-1).tolist()
    if max_tokens is None or max(lengths) <= max_tokens:
        return memory, mask
    b, k, _, d = memory.shape
    pooled = [
        F.adaptive_avg_pool1d(memory[i, :, :n].transpose(1, 2).float(), min(int(n), max_tokens))
        .transpose(1, 2)
        .to(memory.dtype)
        for i, n in enumerate(lengths)
    ]  # each [K, n_i', D]
    width = max(p.shape[1] for p in pooled)
    out = memory.new_zeros(b, k, width, d)  # [B, K, N', D]
    out_mask = torch.zeros(b, width, dtype=torch.bool, device=memory.device)  # [B, N']
    for i, p in enumerate(pooled):
        out[i, :, : p.shape[1]] = p
        out_mask[i, : p.shape[1]] = True
    return out, out_mask


class MemoryKeysValues(nn.Module):
    """Keys and values of the visual memory, `[B, K, N, D] -> 2 x [B, K*H, N, r/H]`.

    Shared by every injection layer of the light read, and run once per image (at prefill).
    """

    def __init__(self, hidden: int, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(hidden, width, bias=False)
        self.value = nn.Linear(hidden, width, bias=False)

    def forward(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_heads(self.key(memory), self.heads), fold_heads(self.value(memory), self.heads)


class VisionRead(nn.Module):
    """Multi-head read of each vision layer separately: `[B, T, D]` -> `[B, T, K, r]`.

    `keys`/`values` `[B, K*H, N, r/H]` come from `MemoryKeysValues` (light read) or, with
    `own_keys_values`, from this layer's own maps (`memory_keys_values`, the full read).
    `memory_mask` `[B, 1, 1, N]` is False at padding (images of a OneVision batch differ in length).
    """

    def __init__(self, hidden: int, width: int, heads: int, own_keys_values: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"read width {width} not divisible by {heads} read heads")
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.query = nn.Linear(hidden, width, bias=False)
        if own_keys_values:
            self.key = nn.Linear(hidden, width, bias=False)
            self.value = nn.Linear(hidden, width, bias=False)

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full read's own keys and values of `memory [B, K, N, D]`."""
        return fold_heads(self.key(memory), self.heads), fold_heads(self.value(memory), self.heads)

    def forward(
        self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t, _ = hidden.shape
        h = self.heads
        k = keys.shape[1] // h
        q = self.query(self.norm(hidden))  # [B, T, r]
        r = q.shape[-1]
        q = q.view(b, t, h, r // h).transpose(1, 2)  # [B, H, T, r/H]
        q = q.unsqueeze(1).expand(b, k, h, t, r // h).reshape(b, k * h, t, r // h)  # [B, K*H, T, r/H]
        read = F.scaled_dot_product_attention(q, keys, values, attn_mask=memory_mask)  # [B, K*H, T, r/H]
        return read.view(b, k, h, t, r // h).permute(0, 3, 1, 2, 4).reshape(b, t, k, r)  # [B, T, K, r]


class Injection(nn.Module):
    """What is added to the residual stream: `tanh(alpha) * W_o(mixed)`, `W_o: r -> D`; alpha starts at 0.

    alpha is a one-element vector (FSDP cannot shard a 0-d parameter); checkpoints of the first
    design store it as a scalar, which the loader reshapes (`cliviz.model.weights.vector_alphas`)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.out_proj = nn.Linear(width, hidden, bias=False)
        self.alpha = nn.Parameter(torch.zeros(1))  # [1]

    def forward(self, mixed: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha).to(mixed.dtype) * self.out_proj(mixed)  # [B, T, D]


class AGFLayer(nn.Module):
    """Gate + read + injection for one LLM layer; returns the residual update `[B, T, D]`."""

    def __init__(
        self,
        hidden: int,
        n_vision: int,
        width: int,
        heads: int,
        temperature: float,
        static_index: int | None,
        own_keys_values: bool = False,
    ) -> None:
        super().__init__()
        self.gate = Gate(hidden, n_vision, temperature) if static_index is None else StaticGate(n_vision, static_index)
        self.read = VisionRead(hidden, width, heads, own_keys_values)
        self.injection = Injection(width, hidden)

    def forward(
        self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        gates = self.gate(hidden)  # [B, T, K]
        reads = self.read(hidden, keys, values, memory_mask)  # [B, T, K, r]
        mixed = torch.einsum("btk,btkr->btr", gates, reads)  # [B, T, r]
        return self.injection(mixed)


class DeepStackLayer(nn.Module):
    """DeepStack baseline: final-layer visual features added at image-token positions, ungated.

    The gate is a constant `[B, T, 1]` of ones (kept so that tracing code is uniform).
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate = StaticGate(1, 0)
        self.norm = nn.LayerNorm(hidden)
        self.injection = Injection(hidden, hidden)

    def forward(self, hidden: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        gates = self.gate(hidden)  # [B, T, 1]
        return self.injection(gates * self.norm(image_features))  # [B, T, D]
