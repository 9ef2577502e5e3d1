"""Statistics over gate vectors: how spread, how dynamic, how much is injected, what they encode.

Every function takes a trace set (a `TraceSet`, a list of `Trace`s, or the `GateRows` already
gathered by `cliviz.analyses.heatmaps.gate_rows`) and returns a tidy pandas DataFrame with the
model's real layer indices. What the numbers mean:

- **Gate entropy** (`entropy_per_layer`): a gate vector g over K vision layers has Shannon
  entropy H(g) = -Σ g_k log g_k (nats), 0 for a one-hot gate (the layer reads one vision layer)
  and log K for a uniform one (it mixes all of them equally). `entropy` is the mean over the
  selected tokens; `effective_layers = exp(entropy)` turns it into "how many vision layers a
  token draws on" (1..K; K for uniform gates). `pooled_entropy` / `pooled_effective_layers` use
  the *mean* gate instead: how many vision layers the LLM layer uses across the whole data set.
  A layer with sharp per-token gates that pick different vision layers for different questions
  has a low `effective_layers` and a high `pooled_effective_layers`.
- **Are the gates dynamic?** (`gate_variance_decomposition`): the total variance of the gate
  vectors of one LLM layer (Σ_k over vision layers, around the grand mean, token-weighted) splits
  exactly into a *within-sample* part (how much the gate moves across the tokens of one
  (image, question) run) and an *across-sample* part (how much the per-run mean gates differ
  between runs). A static one-to-one scheme has both at 0; gates that only depend on the
  question type have within = 0 and across > 0; gates that change token by token have within > 0.
- **Injection norm** (`injection_norm_profile`): the gate says *where from*; the norm of the
  injected residual update says *how much*. Reported per LLM layer and token role, plus
  `answer_step` (the positions whose output is an answer token).
- **Probe** (`probe_qtype`): can the question type be read off the answer-step gates? One sample
  per trace, features = the mean answer-step gate matrix flattened to L*K; a cross-validated
  (stratified K-fold) logistic regression; out-of-fold accuracy is compared with the
  majority-class baseline. Above-baseline accuracy means the gates encode the question type;
  it does not mean the model *uses* what they inject (measure that with ablations).
- **PCA** (`gate_pca`): the same per-trace gate vectors projected on their first principal
  components, with the question type for colouring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cliviz.analyses.reductions import GateRows, TracesLike, as_traceset, gate_rows
from cliviz.errors import CLIVizError

__all__ = [
    "row_entropy",
    "entropy_per_layer",
    "gate_variance_decomposition",
    "injection_norm_profile",
    "trace_gate_vectors",
    "ProbeResult",
    "probe_qtype",
    "gate_pca",
]


def row_entropy(gates: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each gate vector along the last axis (0 log 0 = 0)."""
    p = np.asarray(gates, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=-1)


def entropy_per_layer(traces: TracesLike | GateRows, select: str = "answer") -> pd.DataFrame:
    """Per LLM layer: mean / sd of per-token gate entropy (nats), `effective_layers` =
    exp(mean entropy), the entropy of the mean gate (`pooled_*`), `max_entropy` = log K and
    `normalized_entropy` = entropy / log K (0 when K = 1)."""
    rows = gate_rows(traces, select)
    if len(rows) == 0:
        raise CLIVizError(f"no gate vectors selected ({select!r} positions)")
    h = row_entropy(rows.gates)  # [R, L]
    pooled = row_entropy(rows.gates.astype(np.float64).mean(axis=0))  # [L]
    log_k = float(np.log(rows.K))
    mean_h = h.mean(axis=0)
    return pd.DataFrame(
        {
            "llm_layer": np.asarray(rows.injection_layers, dtype=np.int64),
            "entropy": mean_h,
            "entropy_sd": h.std(axis=0),
            "effective_layers": np.exp(mean_h),
            "pooled_entropy": pooled,
            "pooled_effective_layers": np.exp(pooled),
            "max_entropy": log_k,
            "normalized_entropy": mean_h / log_k if log_k > 0 else np.zeros_like(mean_h),
            "n_tokens": len(rows),
            "n_traces": len(np.unique(rows.trace)),
        }
    )


def gate_variance_decomposition(traces: TracesLike | GateRows, select: str = "all") -> pd.DataFrame:
    """Within-sample vs across-sample variance of the gate vectors, per LLM layer.

    With g_{s,t} the gate vector of token t of sample s (trace), ḡ_s the sample mean and ḡ
    the grand mean (token-weighted), summed over vision layers:
    total = mean_{s,t} |g_{s,t} - ḡ|², within = mean_{s,t} |g_{s,t} - ḡ_s|²,
    across = Σ_s n_s |ḡ_s - ḡ|² / N, and total = within + across exactly.
    `within_share` = within / total (NaN when total is 0: perfectly static gates)."""
    rows = gate_rows(traces, select)
    if len(rows) == 0:
        raise CLIVizError(f"no gate vectors selected ({select!r} positions)")
    g = rows.gates.astype(np.float64)  # [R, L, K]
    ids, starts, counts = np.unique(rows.trace, return_index=True, return_counts=True)
    sample_mean = np.add.reduceat(g, starts, axis=0) / counts[:, None, None]  # [S, L, K]
    grand = g.mean(axis=0)  # [L, K]
    within = ((g - np.repeat(sample_mean, counts, axis=0)) ** 2).sum(-1).mean(0)  # [L]
    across = (counts[:, None] * ((sample_mean - grand) ** 2).sum(-1)).sum(0) / len(g)
    total = ((g - grand) ** 2).sum(-1).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, within / np.where(total > 0, total, 1.0), np.nan)
    return pd.DataFrame(
        {
            "llm_layer": np.asarray(rows.injection_layers, dtype=np.int64),
            "within_sample": within,
            "across_sample": across,
            "total": total,
            "within_share": share,
            "n_samples": len(ids),
            "n_tokens": len(g),
        }
    )


def injection_norm_profile(
    traces: TracesLike | GateRows, roles: tuple[str, ...] = ("image", "prompt", "answer_step")
) -> pd.DataFrame:
    """Injection norm (L2 norm of the residual update) per LLM layer and role: mean, sd, median,
    number of tokens. Roles: `image`, `prompt` (token roles), `all`, and `answer_step` (the
    positions whose output is an answer token). Roles with no token are left out."""
    if isinstance(traces, GateRows):
        raise CLIVizError("injection_norm_profile needs the trace set (it gathers one selection per role)")
    ts = as_traceset(traces)
    frames = []
    for role in roles:
        select = "answer" if role == "answer_step" else role
        rows = gate_rows(ts, select)
        if len(rows) == 0:
            continue
        n = rows.norms.astype(np.float64)  # [R, L]
        frames.append(
            pd.DataFrame(
                {
                    "llm_layer": np.asarray(rows.injection_layers, dtype=np.int64),
                    "role": role,
                    "mean": n.mean(0),
                    "sd": n.std(0),
                    "median": np.median(n, axis=0),
                    "n_tokens": len(n),
                }
            )
        )
    if not frames:
        raise CLIVizError("no tokens with the requested roles: no injection-norm profile")
    return pd.concat(frames, ignore_index=True)


def trace_gate_vectors(traces: TracesLike | GateRows, select: str = "answer") -> tuple[np.ndarray, pd.DataFrame]:
    """One feature vector per trace: its mean selected gate matrix flattened to `[L*K]` (C order:
    LLM layer major). Returns (X `[N, L*K]`, frame with trace, sample_id, qtype per row of X);
    the column names of the features are `L{i}_V{k}` in `X_columns` of the frame's attrs."""
    rows = gate_rows(traces, select)
    ids, mats = rows.per_trace()
    X = mats.reshape(len(ids), -1)
    meta = pd.DataFrame(
        {
            "trace": ids.astype(np.int64),
            "sample_id": rows.sample_id[ids] if len(ids) else np.empty(0, object),
            "qtype": rows.qtype[ids] if len(ids) else np.empty(0, object),
        }
    )
    meta.attrs["X_columns"] = [f"L{i}_V{k}" for i in rows.injection_layers for k in rows.vision_layers]
    meta.attrs["vision_layers"] = rows.vision_layers
    meta.attrs["injection_layers"] = rows.injection_layers
    return X, meta


@dataclass
class ProbeResult:
    """Cross-validated question-type probe on gate vectors (out-of-fold predictions)."""

    accuracy: float  # out-of-fold accuracy over all samples
    fold_accuracies: list[float]
    baseline: float  # majority-class share: accuracy of always answering the most common type
    majority_class: str
    confusion: pd.DataFrame  # counts, index = true qtype, columns = predicted qtype
    classes: list[str]
    n_samples: int
    n_splits: int
    n_features: int
    predictions: pd.DataFrame = field(repr=False)  # trace, sample_id, qtype, predicted, fold

    @property
    def accuracy_sd(self) -> float:
        return float(np.std(self.fold_accuracies))

    def summary(self) -> pd.DataFrame:
        """One-row tidy summary."""
        return pd.DataFrame(
            [
                {
                    "accuracy": self.accuracy,
                    "accuracy_sd": self.accuracy_sd,
                    "baseline": self.baseline,
                    "majority_class": self.majority_class,
                    "n_samples": self.n_samples,
                    "n_classes": len(self.classes),
                    "n_splits": self.n_splits,
                    "n_features": self.n_features,
                }
            ]
        )

    def confusion_long(self) -> pd.DataFrame:
        """Tidy confusion: true_qtype, predicted_qtype, count, row_share (share of the true class)."""
        c = self.confusion
        long = c.stack().rename("count").reset_index()
        long.columns = ["true_qtype", "predicted_qtype", "count"]
        totals = long.groupby("true_qtype")["count"].transform("sum")
        long["row_share"] = np.where(totals > 0, long["count"] / totals.where(totals > 0, 1), 0.0)
        return long


def probe_qtype(
    traces: TracesLike | GateRows, select: str = "answer", n_splits: int = 5, seed: int = 0, C: float = 1.0
) -> ProbeResult:
    """Predict the question type from per-trace gate vectors with a cross-validated (stratified
    K-fold, shuffled with `seed`) logistic regression. Traces without a question type are left
    out; `n_splits` is lowered to the size of the smallest class (at least 2 per class needed)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from cliviz.analyses.probes import one_blas_thread

    X, meta = trace_gate_vectors(traces, select)
    known = meta.qtype.notna().to_numpy()
    X, meta = X[known], meta[known].reset_index(drop=True)
    y = meta.qtype.astype(str).to_numpy()
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise CLIVizError(f"the probe needs traces of at least 2 question types, found {len(classes)}")
    k = int(min(n_splits, counts.min()))
    if k < 2:
        raise CLIVizError(
            f"question type {classes[counts.argmin()]!r} has only {counts.min()} trace(s); "
            "the probe needs at least 2 per type"
        )
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    pred = np.empty(len(y), dtype=object)
    fold = np.empty(len(y), dtype=np.int64)
    accs = []
    for f, (tr, te) in enumerate(cv.split(X, y)):
        clf = LogisticRegression(C=C, max_iter=2000)
        with one_blas_thread():
            clf.fit(X[tr], y[tr])
        pred[te] = clf.predict(X[te])
        fold[te] = f
        accs.append(float(np.mean(pred[te] == y[te])))
    labels = [str(c) for c in classes]
    conf = pd.crosstab(
        pd.Categorical(y, categories=labels), pd.Categorical(pred.astype(str), categories=labels), dropna=False
    )
    conf.index.name, conf.columns.name = "true_qtype", "predicted_qtype"
    conf.index, conf.columns = pd.Index(labels, name="true_qtype"), pd.Index(labels, name="predicted_qtype")
    majority = int(counts.argmax())
    preds = meta.assign(predicted=pred.astype(str), fold=fold)
    return ProbeResult(
        accuracy=float(np.mean(pred == y)),
        fold_accuracies=accs,
        baseline=float(counts.max() / len(y)),
        majority_class=labels[majority],
        confusion=conf.astype(np.int64),
        classes=labels,
        n_samples=len(y),
        n_splits=k,
        n_features=X.shape[1],
        predictions=preds,
    )


def gate_pca(traces: TracesLike | GateRows, select: str = "answer", n_components: int = 2) -> pd.DataFrame:
    """PCA of the per-trace gate vectors (see `trace_gate_vectors`): columns trace, sample_id,
    qtype, PC1..PCn; `attrs["explained_variance_ratio"]` holds the variance share per component."""
    from sklearn.decomposition import PCA

    X, meta = trace_gate_vectors(traces, select)
    if len(X) < 2:
        raise CLIVizError("PCA needs at least 2 traces with selected gates")
    n = int(min(n_components, X.shape[0], X.shape[1]))
    pca = PCA(n_components=n)
    Z = pca.fit_transform(X)
    out = meta.copy()
    for j in range(n):
        out[f"PC{j + 1}"] = Z[:, j]
    out.attrs["explained_variance_ratio"] = [float(v) for v in pca.explained_variance_ratio_]
    out.attrs["components"] = pca.components_.tolist()
    return out
