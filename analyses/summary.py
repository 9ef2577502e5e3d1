"""One streaming pass over a trace set: everything the figures, the dashboard's data-set tab and
`TraceSet.heatmap()` draw, in memory that depends on the shapes, never on the number of traces.

`summarize(ts)` reads the set one row group at a time (`TraceSet.batches`) and keeps:
- per trace, its mean content-answer gate matrix `[L, K]` (a `GateRows` with one row per trace, so
  `mean_gate_matrix`, `grouped_gate_matrices`, probes and PCA take it as they take a whole set:
  the per-trace mean of one row is that row);
- running sums for the answer-step gate entropy per LLM layer (mean, sd, entropy of the mean gate);
- running sums for the within- vs across-sample variance over every position (Chan et al.'s
  pooled form: Σ within-sample squares, Σ n_s ḡ_s and Σ n_s |ḡ_s|²), exact, not sampled;
- the meta columns analyses group by (question type, sample id, model) and each trace's answer length.

At LLaVA-1.5-7B shapes (31 x 25) the per-trace part is 3 KB a trace: 4,096 traces hold 12 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from cliviz.analyses.reductions import GateRows, as_traceset, gate_rows, selection_note
from cliviz.analyses.stats import row_entropy
from cliviz.analyses.untrained import largest_norm, untrained_note_from_norm
from cliviz.errors import CLIVizError
from cliviz.tracing.compact import Compact
from cliviz.tracing.store import check_one_model

__all__ = ["GateSummary", "summarize"]


@dataclass
class GateSummary:
    """What one pass over a trace set keeps (see the module docstring)."""

    rows: GateRows  # one row per trace with selected positions: its mean gate over them
    entropy: pd.DataFrame  # columns of `stats.entropy_per_layer`
    variance: pd.DataFrame | None  # columns of `stats.gate_variance_decomposition`; None for compact sets
    n_traces: int  # rows of the set
    models: list[str]  # distinct meta.model, first-seen order
    answer_lengths: np.ndarray  # [n_traces] answer steps per trace
    include_special: bool
    compact: Compact
    select: str = "answer"
    entropy_sum: np.ndarray | None = None  # [N, L] per row of `rows`: Σ over its positions of the gate entropy
    entropy_sq: np.ndarray | None = None  # [N, L] Σ of squared entropies
    positions: np.ndarray | None = None  # [N] selected positions per row of `rows`
    max_injection_norm: float | None = None  # largest injection norm recorded in the set (None: unknown)

    def entropy_by(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(mean entropy [L], sd [L], tokens, traces) over the rows of `rows` in `mask`."""
        n = self.positions[mask].sum()
        mean = self.entropy_sum[mask].sum(0) / n
        sd = np.sqrt(np.maximum(self.entropy_sq[mask].sum(0) / n - mean**2, 0.0))
        return mean, sd, int(n), int(mask.sum())

    @property
    def n_gated(self) -> int:
        """Traces that contribute to the maps (gates and at least one answer step)."""
        return len(self.rows.trace)

    @property
    def note(self) -> str:
        """What the maps average and over what, for captions: model(s), traces, tokens — and, when no
        trace injected anything, the untrained-gates warning (every map says so, `analyses.untrained`)."""
        models = ", ".join(self.models[:3]) + (f" and {len(self.models) - 3} more" if len(self.models) > 3 else "")
        kind = "models" if len(self.models) > 1 else "model"
        text = f"{kind} {models}; {self.n_gated} traces; {selection_note(self.select, self.include_special)}"
        text = text if self.compact.lossless else f"{text}; stored as {self.compact.describe()}"
        untrained = self.untrained_note
        return f"{text}; {untrained}" if untrained else text

    @property
    def untrained_note(self) -> str | None:
        """The untrained-gates warning when no trace of the set injected anything (`analyses.untrained`)."""
        return untrained_note_from_norm(self.max_injection_norm)


class _Entropy:
    def __init__(self) -> None:
        self.n, self.sum_h, self.sum_h2, self.sum_g = 0, 0.0, 0.0, 0.0

    def add(self, gates: np.ndarray) -> None:  # [R, L, K]
        h = row_entropy(gates)  # [R, L]
        self.n += len(gates)
        self.sum_h = self.sum_h + h.sum(0)
        self.sum_h2 = self.sum_h2 + (h**2).sum(0)
        self.sum_g = self.sum_g + gates.astype(np.float64).sum(0)

    def frame(self, injection_layers: list[int], k: int, n_traces: int) -> pd.DataFrame:
        mean_h = self.sum_h / self.n
        sd = np.sqrt(np.maximum(self.sum_h2 / self.n - mean_h**2, 0.0))
        pooled = row_entropy(self.sum_g / self.n)
        log_k = float(np.log(k))
        return pd.DataFrame(
            {
                "llm_layer": np.asarray(injection_layers, dtype=np.int64),
                "entropy": mean_h,
                "entropy_sd": sd,
                "effective_layers": np.exp(mean_h),
                "pooled_entropy": pooled,
                "pooled_effective_layers": np.exp(pooled),
                "max_entropy": log_k,
                "normalized_entropy": mean_h / log_k if log_k > 0 else np.zeros_like(mean_h),
                "n_tokens": self.n,
                "n_traces": n_traces,
            }
        )


class _Variance:
    """Within- vs across-sample variance over every position, from per-sample sums (exact):
    within = Σ_s (Σ_t |g_st|² - n_s |ḡ_s|²), across = Σ_s n_s |ḡ_s|² - N |ḡ|², both / N."""

    def __init__(self) -> None:
        self.n, self.samples, self.sq, self.sum_nm, self.sum_nm2 = 0, 0, 0.0, 0.0, 0.0

    def add_table(self, table) -> None:
        """Every gated trace of a batch (its stored [L, T, K] gates, read in place, one trace at a time)."""
        values = table.column("gates").combine_chunks()
        shapes = np.asarray(table.column("gates_shape").combine_chunks().flatten().to_numpy(), dtype=np.int64).reshape(
            -1, 3
        )
        offsets = np.asarray(values.offsets.to_numpy(), dtype=np.int64)
        flat = values.flatten().to_numpy(zero_copy_only=False)
        for i, (L, T, K) in enumerate(shapes):
            if L * T * K == 0:
                continue
            g = flat[offsets[i] : offsets[i + 1]].reshape(L, T, K)  # [L, T, K]
            m = g.mean(axis=1, dtype=np.float64)  # [L, K]: this sample's mean gate
            self.sq = self.sq + np.einsum("ltk,ltk->l", g, g, dtype=np.float64)
            self.sum_nm = self.sum_nm + T * m
            self.sum_nm2 = self.sum_nm2 + T * (m**2).sum(-1)
            self.n += int(T)
            self.samples += 1

    def frame(self, injection_layers: list[int]) -> pd.DataFrame:
        grand = self.sum_nm / self.n  # [L, K]
        within = np.maximum(self.sq - self.sum_nm2, 0.0) / self.n
        across = np.maximum(self.sum_nm2 / self.n - (grand**2).sum(-1), 0.0)
        total = within + across
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(total > 0, within / np.where(total > 0, total, 1.0), np.nan)
        return pd.DataFrame(
            {
                "llm_layer": np.asarray(injection_layers, dtype=np.int64),
                "within_sample": within,
                "across_sample": across,
                "total": total,
                "within_share": share,
                "n_samples": self.samples,
                "n_tokens": self.n,
            }
        )


def _gated(batch) -> bool:
    shapes = np.asarray(batch.table.column("gates_shape").combine_chunks().flatten().to_numpy(), dtype=np.int64)
    return bool(len(shapes) and (shapes.reshape(-1, 3).prod(axis=1) > 0).any())


def summarize(
    traces,
    *,
    select: str = "answer",
    include_special: bool = False,
    pool: bool = False,
    variance: bool = True,
) -> GateSummary:
    """Stream once over `traces` (a `TraceSet` on disk or in memory, or Traces) and keep what every
    set-level figure needs, for the `select`ed positions (answer, image, prompt, all). CLIVizError for a
    set that mixes models (unless `pool`), mixes layer lists, or has no trace with gates there."""
    ts = as_traceset(traces)
    means, ids, qtype, sample_id, model, hashes, lengths, gated = [], [], [], [], [], [], [], []
    h_sum, h_sq, counts = [], [], []
    norm_tops: list[float | None] = []  # per batch with gates: its largest injection norm
    entropy, var = _Entropy(), _Variance()
    layers: tuple[list[int], list[int]] | None = None
    compact = ts.compaction
    variance = variance and compact.positions == "all"
    start = 0
    for batch in ts.batches():
        t = batch.table
        qtype += t.column("qtype").to_pylist()
        sample_id += t.column("sample_id").to_pylist()
        model += t.column("model").to_pylist()
        hashes += t.column("config_hash").to_pylist()
        lengths.append(np.asarray(t.column("answer_positions").combine_chunks().value_lengths(), dtype=np.int64))
        if _gated(batch):
            rows = gate_rows(batch, select, include_special)
            if layers is None:
                layers = (rows.vision_layers, rows.injection_layers)
            elif layers != (rows.vision_layers, rows.injection_layers):
                raise CLIVizError(
                    f"traces mix layer lists (vision {layers[0]} / LLM {layers[1]} and vision {rows.vision_layers} / "
                    f"LLM {rows.injection_layers}); analyse them separately"
                )
            gated.append(rows.gated)
            norm_tops.append(largest_norm(pc.list_flatten(t.column("injection_norm")).to_numpy(zero_copy_only=False)))
            if len(rows):
                tr, m = rows.per_trace()
                ids.append(tr + start)
                means.append(m.astype(np.float32))
                entropy.add(rows.gates)
                _, first, n_pos = np.unique(rows.trace, return_index=True, return_counts=True)
                h = row_entropy(rows.gates)  # [R, L]
                h_sum.append(np.add.reduceat(h, first, axis=0))
                h_sq.append(np.add.reduceat(h**2, first, axis=0))
                counts.append(n_pos)
            if variance:
                var.add_table(t)
        else:
            gated.append(np.zeros(t.num_rows, dtype=bool))
        start += t.num_rows
    if start == 0:
        raise CLIVizError("the trace set is empty: nothing to analyse")
    if layers is None:
        raise CLIVizError("no trace in the set has gates (projector fusion records none): nothing to analyse")
    if not means:
        what = "an answer step" if select == "answer" else f"{select} positions"
        raise CLIVizError(f"no trace with gates has {what}: nothing to draw")
    if not pool:
        check_one_model(list(zip(hashes, model)), "this trace set")
    vision, injection = layers
    per_trace = np.concatenate(means)  # [N, L, K]
    trace_ids = np.concatenate(ids)
    rows = GateRows(
        gates=per_trace,
        norms=np.zeros(per_trace.shape[:2], np.float32),
        trace=trace_ids,
        position=np.zeros(len(trace_ids), np.int64),
        step=np.zeros(len(trace_ids), np.int64),
        vision_layers=vision,
        injection_layers=injection,
        qtype=np.array(qtype, dtype=object),
        sample_id=np.array(sample_id, dtype=object),
        gated=np.concatenate(gated),
        select=select,
    )
    return GateSummary(
        rows=rows,
        entropy=entropy.frame(injection, len(vision), len(trace_ids)),
        variance=var.frame(injection) if variance and var.n else None,
        n_traces=start,
        models=list(dict.fromkeys(str(m) for m in model)),
        answer_lengths=np.concatenate(lengths),
        include_special=include_special,
        compact=compact,
        select=select,
        entropy_sum=np.concatenate(h_sum),
        entropy_sq=np.concatenate(h_sq),
        positions=np.concatenate(counts),
        max_injection_norm=None if None in norm_tops else max(t for t in norm_tops if t is not None),
    )
