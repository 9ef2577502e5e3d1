"""The intervention itself: how each row of a chunk rewrites the gates and injections it runs through.

Everything intervenes on the two hook points every cliviz analysis shares, through nnsight
(`cliviz.intervene.envoy`): the gate module `agf.<j>.gate` (output `[B, T, K]`, a softmax over
the K selected vision layers) and the injection module `agf.<j>.injection` (output `[B, T, D]`, the
residual update `tanh(alpha) W_o sum_k g_k c_k` of LLM layer `config.injection_layers[j]`). Rows of
one chunk carry different conditions, so at each injection layer the chunk's gates are rewritten
row by row by one vectorised expression (`apply_gate_ablation`) from masks and fills precomputed
per chunk (`chunk_ops`); rows with no intervention at that layer pass through bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cliviz.errors import CLIVizError
from cliviz.intervene.layout import Batch, Sample, donor_map
from cliviz.intervene.spec import Plan

if TYPE_CHECKING:
    from cliviz.intervene.engine import Reference


def apply_gate_ablation(
    gates: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, renorm: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """Rewrite a chunk's gates `[R, T, K]` row by row in one expression.

    At positions where `mask [R, T]` is set: `g' = (g * keep) / (renorm ? sum(g * keep) : 1) + fill`
    (`keep [R, K]`, `renorm [R]` bool, `fill [R, T, K]`). Elsewhere the gate is returned untouched,
    bit for bit. knockout = keep 0 on the chosen layers + renorm; zero = keep 0, no renorm;
    uniform/onehot/mean/patch = keep 0 everywhere, fill = the replacement.
    """
    g = gates.float()
    kept = g * keep[:, None, :]
    total = kept.sum(-1, keepdim=True)
    # an all-zero remainder (everything was on the knocked-out layers) stays all-zero
    scaled = torch.where(renorm[:, None, None], kept / total.clamp_min(torch.finfo(torch.float32).tiny), kept)
    new = scaled + fill
    return torch.where(mask[..., None], new, g).to(gates.dtype)


@dataclass
class LayerOps:
    """What a chunk does at one injection layer (None fields: nothing there)."""

    gate: tuple[torch.Tensor, ...] | None = None  # (mask, keep, renorm, fill) for apply_gate_ablation
    inj_off: torch.Tensor | None = None  # [R, T] bool: zero the injection there


def apply_ablation(
    wrapped,
    j: int,
    ops: LayerOps | None,
    saved: list | None = None,
    *,
    reads_saved: dict | None = None,
    reads_replacement: torch.Tensor | None = None,
) -> None:
    """Inside an nnsight trace: the chunk's interventions at injection layer `j`, in the order the
    AGF layer runs its modules — gate (rewrite, optionally keep), read (keep it, or skip it with the
    reference run's reads when they cannot have changed), injection (zero it where asked)."""
    agf = wrapped.agf[j]
    if ops is not None and ops.gate is not None:
        agf.gate.output = apply_gate_ablation(agf.gate.output, *ops.gate)
    if saved is not None:
        saved.append(agf.gate.output.float())
    if reads_replacement is not None:
        agf.read.skip(reads_replacement)
    elif reads_saved is not None:
        reads_saved[j] = agf.read.output
    if ops is not None and ops.inj_off is not None:
        out = agf.injection.output
        agf.injection.output = out.masked_fill(ops.inj_off[..., None], 0)


def means_for(plan: Plan, ref: Reference, samples: list[Sample]) -> Any:
    """A ``mean`` ablation's mean gates: given (`Ablation.means`), or pooled from the reference runs."""
    a = plan.ablation
    if a.means is not None:
        if isinstance(a.means, Mapping):
            return {str(q): np.asarray(m, dtype=np.float32) for q, m in a.means.items()}
        return np.asarray(a.means, dtype=np.float32)
    sums, counts = ref.token_sums[a.tokens]
    if not a.per_qtype:
        return (sums.sum(0) / max(counts.sum(), 1)).astype(np.float32)
    labels = np.asarray([str(s.qtype) for s in samples])
    return {
        q: (sums[labels == q].sum(0) / max(counts[labels == q].sum(), 1)).astype(np.float32)
        for q in sorted(set(labels))
    }


def _mean_vector(means: Any, qtype: str | None, j: int, n_layers: int, k: int) -> np.ndarray:
    """`[K]`: the mean gate of injection position `j` (for `qtype` when the means are per type)."""
    m = means
    if isinstance(m, Mapping):
        if str(qtype) not in m:
            have = ", ".join(map(str, m))
            raise CLIVizError(f"no mean gates for question type {qtype!r} (have: {have})")
        m = m[str(qtype)]
    if m.shape != (n_layers, k):
        raise CLIVizError(f"mean gates have shape {m.shape}, expected ({n_layers}, {k}) for this model")
    return m[j]


def chunk_ops(
    rows: list[tuple[int, int]],
    plans: Mapping[int, Plan],
    batch: Batch,
    samples: list[Sample],
    ref: Reference,
    means: dict[int, Any],
    n_layers: int,
    k: int,
    image_id: int,
    device,
    plan_cfg,
) -> list[LayerOps | None]:
    """Per-layer masks and fills for one chunk of (sample, condition) rows."""
    n_rows, width = batch.ids.shape
    ops: list[LayerOps | None] = []
    for j in range(n_layers):
        gate_rows = [r for r, (_, c) in enumerate(rows) if plans[c].touches_gate and j in plans[c].layers]
        inj_rows = [r for r, (_, c) in enumerate(rows) if plans[c].inj_off and j in plans[c].layers]
        layer = LayerOps()
        if gate_rows:
            mask = np.zeros((n_rows, width), dtype=bool)
            keep = np.ones((n_rows, k), dtype=np.float32)
            renorm = np.zeros(n_rows, dtype=bool)
            fill = np.zeros((n_rows, width, k), dtype=np.float32)
            for r in gate_rows:
                s, c = rows[r]
                plan, sample, off = plans[c], samples[s], batch.offsets[r]
                tok = sample.token_mask(plan.ablation.tokens, image_id)
                kind = plan.ablation.kind
                if plan.keep is not None:
                    keep[r] = plan.keep
                    renorm[r] = plan.renorm
                else:
                    keep[r] = 0.0
                    if plan.fill is not None:
                        fill[r, off:] = plan.fill
                    elif kind == "mean":
                        fill[r, off:] = _mean_vector(means[c], sample.qtype, j, n_layers, k)
                    elif kind == "patch":
                        d = plan.ablation.value if plan.ablation.value is not None else (s + 1) % len(samples)
                        if not 0 <= d < len(samples):
                            raise CLIVizError(f"patch donor {d} outside 0..{len(samples) - 1}")
                        where = donor_map(sample, samples[d], image_id)
                        has = where >= 0
                        assert ref.gates is not None  # kept by the reference run whenever a patch is planned
                        fill[r, off:][has] = ref.gates[d][j][where[has]]
                        tok = tok & has
                mask[r, off:] = tok
            layer.gate = (
                torch.from_numpy(mask).to(device),
                torch.from_numpy(keep).to(device),
                torch.from_numpy(renorm).to(device),
                torch.from_numpy(fill).to(device),
            )
        if inj_rows:
            off_mask = np.zeros((n_rows, width), dtype=bool)
            for r in inj_rows:
                s, c = rows[r]
                off_mask[r, batch.offsets[r] :] = samples[s].token_mask(plans[c].ablation.tokens, image_id)
            layer.inj_off = torch.from_numpy(off_mask).to(device)
        ops.append(layer if (layer.gate is not None or layer.inj_off is not None) else None)
    return ops
