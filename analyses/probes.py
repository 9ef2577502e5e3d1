"""Layer probes: what does each vision layer know about the scene?

For every vision hidden state (index 0 = the patch embedding, n = the last layer) we fit linear
probes — scikit-learn's logistic regression on standardised features — that read a scene property
from that layer's tokens: per patch (what lies under this patch: colour, shape, size, position,
digit), per image (mean-pooled patch tokens, and the CLS token where the tower has one: count,
the corner digit, and the colour / shape / side / size of an object named as the questions name
it) and per object (`object`: the tokens averaged over the named object's own patches — what a
read that knows where the object is could get; a mean over the whole image cannot tell which
object is meant, so its side and position probes sit at the baseline). See
`cliviz.analyses.probe_labels` for the exact targets.

Why this matters for CLI: the LLaVA projector reads one layer (`vision_feature_layer`). If the
detail a question needs is linearly decodable from a shallow layer but not from that one, the
projector path is a bottleneck, and cross-layer injection has something real to fetch. The probe
accuracy per (layer, property) is the evidence; `ProbeReport.bottleneck()` puts the best shallow
layer beside the projector's layer.

Honesty of the numbers: cross-validation holds whole images out (stratified group folds by image,
the same folds for every layer, so layers are compared on the same splits); the majority baseline
is cross-validated the same way (the training folds' most common label); every row also carries
`control` (image-level and per-object probes), the accuracy of the same probe on the same folds with
the labels permuted (seeded), which must sit at that baseline — a probe above its control reads the
property, not the split (patch probes, thousands of rows, leave it NaN: `control=True` runs them all
permuted);
`control=True` permutes the labels of the main probes too. The tower runs once per image, batched
(`model.encode_images`), and only the sampled patch tokens are kept.

Example::

    from cliviz.analyses.probes import probe_layers
    from cliviz.analyses.probe_labels import generated_scenes
    from cliviz.model.loading import load_model

    model, _ = load_model("assets/models/cli-tiny", device="cpu")
    report = probe_layers(model, [s for _, s in generated_scenes(200, seed=5)], folds=3)
    print(report.table())          # layers x properties, accuracy
    print(report.bottleneck())     # best shallow layer vs the layer the projector reads
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from cliviz.analyses.probe_labels import (
    ObjectCells,
    PatchSample,
    ProbeTask,
    Property,
    image_tasks,
    object_cells,
    patch_tasks,
    select_properties,
)
from cliviz.data.scenes import Scene
from cliviz.errors import CLIVizError

FEATURES = {
    "patch": "the patch token",
    "mean": "mean of the patch tokens",
    "cls": "the CLS token",
    "object": "mean of the named object's patch tokens",
}
Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ------------------------------------------------------------------------------------ the tower


@dataclass
class TowerLayout:
    """How the vision tower's tokens map onto the image: grid, CLS, hidden states, the projector's layer."""

    n_states: int  # hidden states 0..n_states-1 (0 = patch embedding)
    grid: int  # patches per side (of the base crop for OneVision)
    projector_layer: int  # the hidden state the LLaVA projector reads, as a non-negative index
    onevision: bool

    @classmethod
    def of(cls, model) -> TowerLayout:
        base = model.config.base_config
        vc = base.vision_config
        n_states = int(vc.num_hidden_layers) + 1
        feature_layer = base.vision_feature_layer
        if not isinstance(feature_layer, int) or not -n_states <= feature_layer < n_states:
            raise CLIVizError(
                f"the model's vision_feature_layer {feature_layer!r} is not a layer of its "
                f"{n_states}-state vision tower"
            )
        return cls(
            n_states,
            int(vc.image_size) // int(vc.patch_size),
            feature_layer % n_states,
            model.config.base_model_type == "llava_onevision",
        )


@dataclass
class VisionStates:
    """Kept tokens per layer: sampled patch tokens, mean-pooled patch tokens, CLS (None: no CLS)."""

    patch: dict[int, np.ndarray]  # layer -> [R, D]
    mean: dict[int, np.ndarray]  # layer -> [n_images, D]
    cls: dict[int, np.ndarray] | None  # layer -> [n_images, D]
    objects: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [n_objects, D]


def _base_crop_rows(model, image_sizes: torch.Tensor) -> np.ndarray:
    """OneVision: the tower's rows holding each image's base crop (the whole image resized), which
    the image processor puts first among that image's crops."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config.base_config
    crops = [
        image_size_to_num_patches(list(map(int, size)), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in image_sizes.tolist()
    ]
    return np.concatenate([[0], np.cumsum(crops)[:-1]]).astype(np.int64)


@torch.inference_mode()
def vision_states(
    model,
    scenes: Sequence[Scene],
    layout: TowerLayout,
    layers: Sequence[int],
    sample: PatchSample,
    batch_size: int = 64,
    progress: Progress | None = None,
    objects: ObjectCells | None = None,
) -> VisionStates:
    """Run the vision tower once per image (batched) and keep, for each layer in `layers`, the tokens
    the probes need (with `objects`: each object's patch tokens averaged, `[n_objects, D]`). Tokens
    are float32 on the CPU whatever the model's dtype."""
    from cliviz.model.processing import image_inputs

    n, patches = len(scenes), layout.grid**2
    order = np.argsort(sample.image, kind="stable")  # patch rows grouped by image
    bounds = np.searchsorted(sample.image[order], np.arange(n + 1))
    out = VisionStates({}, {}, {})
    for start in range(0, n, batch_size):
        images = [s.image for s in scenes[start : start + batch_size]]
        inputs = image_inputs(images, model.config)
        states = model.encode_images(**inputs.to_model(model.device, model.dtype)).hidden_states
        if len(states) != layout.n_states:
            raise CLIVizError(
                f"the vision tower returned {len(states)} hidden states, its config says {layout.n_states}"
            )
        rows = _base_crop_rows(model, inputs.image_sizes) if layout.onevision else np.arange(len(images))
        for k in layers:
            hs = states[k][torch.as_tensor(rows)].float().cpu().numpy()  # [b, N, D]
            has_cls = _check_tokens(hs.shape[1], patches)
            tokens = hs[:, 1:] if has_cls else hs  # [b, P, D]
            if k not in out.mean:  # first batch: allocate
                out.mean[k] = np.zeros((n, hs.shape[-1]), np.float32)
                if objects is not None:
                    out.objects[k] = np.zeros((len(objects.image), hs.shape[-1]), np.float32)
                out.patch[k] = np.zeros((len(sample.image), hs.shape[-1]), np.float32)
                if has_cls:
                    out.cls[k] = np.zeros((n, hs.shape[-1]), np.float32)
                else:
                    out.cls = None
            out.mean[k][start : start + len(images)] = tokens.mean(axis=1)
            if out.cls is not None:
                out.cls[k][start : start + len(images)] = hs[:, 0]
            mine = order[bounds[start] : bounds[start + len(images)]]  # sampled rows of this batch's images
            out.patch[k][mine] = tokens[sample.image[mine] - start, sample.patch[mine]]
            if objects is not None:
                for r in np.flatnonzero((objects.image >= start) & (objects.image < start + len(images))):
                    cells = objects.cells[r]
                    if len(cells):
                        out.objects[k][r] = tokens[objects.image[r] - start, cells].mean(axis=0)
        if progress is not None:
            progress("vision tower", min(start + batch_size, n), n)
    return out


def _check_tokens(n_tokens: int, patches: int) -> bool:
    """True when the first token is a CLS token (CLIP), False when every token is a patch (SigLIP)."""
    if n_tokens not in (patches, patches + 1):
        raise CLIVizError(
            f"the vision tower gives {n_tokens} tokens per image, which do not map onto its {patches}-patch grid"
        )
    return n_tokens == patches + 1


# ------------------------------------------------------------------------------------ the probes


@dataclass
class _Folds:
    """Cross-validation splits of one task, shared by every layer and feature."""

    task: ProbeTask
    y: np.ndarray  # [n] int class ids
    splits: list[tuple[np.ndarray, np.ndarray]]


def _make_folds(task: ProbeTask, folds: int, seed: int, control: bool) -> _Folds | str:
    """Stratified folds grouped by image (no image in both train and test), or why the task is skipped."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = task.labels
    if control:
        labels = np.random.default_rng([seed, 7]).permutation(labels)
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        return "one class only"
    if len(np.unique(task.images)) < folds:
        return f"fewer than {folds} images"
    if np.bincount(y).max() < folds:
        return f"no class has {folds} members"
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only k members"
        splits = list(cv.split(np.zeros(len(y)), y, task.images))
    return _Folds(task, y, splits)


def fold_count(tasks: Sequence[ProbeTask], folds: int) -> int:
    """The folds the class counts allow: at most `folds`, and no more than the larger classes of every
    task with two or more classes hold (stratified splits need members of a class in each fold), so a
    small set (`--n 12`) gets fewer folds instead of an error; never below 2."""
    allowed = folds
    for task in tasks:
        _, counts = np.unique(task.labels, return_counts=True)
        groups = len(np.unique(task.images))
        if len(counts) >= 2 and min(int(counts.max()), groups) >= 2:
            allowed = min(allowed, int(counts.max()), groups)
    return max(2, allowed)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Small probe fits (hundreds of rows, 64-4,096 features) gain nothing from BLAS threads, and
    OpenBLAS's spinning threads make each fit many times slower when another process holds a core
    (measured 0.058 s vs 0.0043 s per fit; `benchmarks/bench_probes.py`)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _fold_counts(X: np.ndarray, f: _Folds, C: float) -> np.ndarray:
    """Per fold: [probe correct, majority-baseline correct, test size] -> `[folds, 3]`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros((len(f.splits), 3), np.int64)
    for i, (train, test) in enumerate(f.splits):
        ytr, yte = f.y[train], f.y[test]
        majority = np.bincount(ytr).argmax()
        if len(np.unique(ytr)) == 1:
            pred = np.full(len(test), ytr[0])
        else:
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                probe.fit(X[train], ytr)
            pred = probe.predict(X[test])
        out[i] = (np.sum(pred == yte), np.sum(yte == majority), len(test))
    return out


def _features(states: VisionStates, level: str, per_object: bool = False) -> list[tuple[str, dict[int, np.ndarray]]]:
    if level == "patch":
        return [("patch", states.patch)]
    out = [("mean", states.mean)] + ([("cls", states.cls)] if states.cls is not None else [])
    return out + ([("object", states.objects)] if per_object and states.objects else [])


def _rows_of(task: ProbeTask, feature: str) -> np.ndarray:
    """The task's rows in a feature's matrix: objects for `object`, images / patch rows otherwise."""
    return task.objects if feature == "object" else task.rows


def _permuted(f: _Folds, seed: int) -> _Folds:
    """The same folds with the labels shuffled (seeded): the control every probe must fall to."""
    return _Folds(f.task, np.random.default_rng([seed, 11]).permutation(f.y), f.splits)


def _row(
    layer: int,
    feature: str,
    prop: Property,
    folds: list[_Folds],
    counts: np.ndarray,
    layout: TowerLayout,
    control: np.ndarray | None = None,
) -> dict:
    """One (layer, feature, property) row from the per-fold counts summed over the property's tasks."""
    fold_acc = counts[:, 0] / np.maximum(counts[:, 2], 1)
    classes = set().union(*(set(f.task.labels) for f in folds))
    total = int(counts[:, 2].sum())
    return {
        "layer": layer,
        "feature": feature,
        "property": prop.name,
        "level": prop.level,
        "accuracy": counts[:, 0].sum() / total,
        "accuracy_sd": float(np.std(fold_acc)),
        "majority": counts[:, 1].sum() / total,
        "control": control[:, 0].sum() / total if control is not None else math.nan,
        "chance": 1.0 / len(classes),
        "n_classes": len(classes),
        "n_samples": total,
        "n_images": len(set().union(*(set(f.task.images.tolist()) for f in folds))),
        "n_probes": len(folds),
        "projector": layer == layout.projector_layer,
        "qtypes": ",".join(prop.qtypes),
    }


def probe_layers(
    model,
    scenes: Sequence[Scene],
    *,
    properties: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    seed: int = 0,
    max_patches: int = 3000,
    C: float = 1.0,
    control: bool = False,
    permuted_control: bool = True,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> ProbeReport:
    """Linear probes of scene properties from every vision layer of `model` (a loaded cliviz model).

    `scenes`: ShapesVQA scenes (`probe_labels.generated_scenes` / `folder_scenes`). `properties`:
    names or `level:name` keys (default: all, see `probe_labels.PROPERTIES`). `layers`: hidden-state
    indices (default: all). `max_patches`: patch tokens kept per patch sample (object patches,
    glyph patches). `control`: permute the labels (the probes should fall to the majority baseline).
    `permuted_control`: also fit every image-level probe on permuted labels, same folds (`control`).
    """
    props = select_properties(properties)
    layout, chosen = check_probe_args(model, len(scenes), layers, folds, max_patches)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample, tasks = patch_tasks(scenes, layout.grid, props, max_patches, rng)
    objects = object_cells(scenes, layout.grid)
    tasks += image_tasks(scenes, props, objects)
    states = vision_states(model, scenes, layout, chosen, sample, batch_size, progress, objects)
    t1 = time.perf_counter()
    prepared, skipped = {}, {}
    asked, folds = folds, fold_count(tasks, folds)
    for task in tasks:
        made = _make_folds(task, folds, seed, control)
        name = task.prop.key + (f"[{task.subset}]" if task.subset else "")
        if isinstance(made, str):
            skipped[name] = made
        else:
            prepared.setdefault(task.prop, []).append(made)
    rows = []

    def per_object(prop_folds: list[_Folds]) -> bool:
        return all(f.task.objects is not None for f in prop_folds)

    total = len(chosen) * sum(len(_features(states, p.level, per_object(fs))) for p, fs in prepared.items())
    with one_blas_thread():  # thousands of small fits: BLAS threads only spin (13x slower on a busy box)
        for k in chosen:
            for prop, prop_folds in prepared.items():
                for feature, mats in _features(states, prop.level, per_object(prop_folds)):
                    counts = sum(_fold_counts(mats[k][_rows_of(f.task, feature)], f, C) for f in prop_folds)
                    ctrl = None
                    if permuted_control and prop.level == "image":  # patch probes: use control=True (cost)
                        ctrl = sum(
                            _fold_counts(mats[k][_rows_of(f.task, feature)], _permuted(f, seed), C) for f in prop_folds
                        )
                    rows.append(_row(k, feature, prop, prop_folds, counts, layout, ctrl))
                    if progress is not None:
                        progress("probes", len(rows), total)
    frame = pd.DataFrame(rows)
    if frame.empty:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise CLIVizError(f"no property could be probed on these images: {why}")
    meta = {
        "n_images": len(scenes),
        "grid": layout.grid,
        "has_cls": states.cls is not None,
        "folds": folds,
        "folds_asked": asked,
        "seed": seed,
        "max_patches": max_patches,
        "C": C,
        "control": control,
        "permuted_control": permuted_control,
        "n_states": layout.n_states,
        "projector_layer": layout.projector_layer,
        "layers": list(chosen),
        "crop": "base" if layout.onevision else "",
        "seconds": {"tower": t1 - t0, "probes": time.perf_counter() - t1},
    }
    return ProbeReport(frame, meta, skipped)


def check_probe_args(
    model, n_images: int, layers: Sequence[int] | None = None, folds: int = 5, max_patches: int = 3000
) -> tuple[TowerLayout, list[int]]:
    """The tower's layout and the layers to probe, or a one-line `CLIVizError` (before any work)."""
    layout = TowerLayout.of(model)
    if folds < 2:
        raise CLIVizError(f"--folds must be at least 2, got {folds}")
    if max_patches < 1:
        raise CLIVizError(f"--max-patches must be at least 1, got {max_patches}")
    if n_images == 0:
        raise CLIVizError("no images to probe")
    if n_images < 2 * folds:
        raise CLIVizError(f"{n_images} images are too few for {folds}-fold probes (need at least {2 * folds})")
    chosen = list(range(layout.n_states)) if layers is None else sorted(set(int(k) for k in layers))
    bad = [k for k in chosen if not 0 <= k < layout.n_states]
    if bad or not chosen:
        raise CLIVizError(
            f"layer {bad[0] if bad else '(none)'} is not a vision layer of this model "
            f"(hidden states 0..{layout.n_states - 1})"
        )
    return layout, chosen


# ------------------------------------------------------------------------------------ the report


@dataclass
class ProbeReport:
    """Probe accuracies: `frame` has one row per (layer, feature, property) — accuracy and its sd over
    folds, the cross-validated majority baseline, chance (1 / classes), sample counts, whether the
    projector reads that layer; `meta` the settings; `skipped` the tasks that could not be probed."""

    frame: pd.DataFrame
    meta: dict
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def projector_layer(self) -> int:
        return int(self.meta["projector_layer"])

    @property
    def columns(self) -> list[str]:
        """`feature:property` in the frame's order (the table's and the figure's columns)."""
        return list(dict.fromkeys(self.frame.feature + ":" + self.frame.property))

    def table(self, value: str = "accuracy") -> pd.DataFrame:
        """Layers x `feature:property` of one column of `frame` (accuracy by default)."""
        f = self.frame.assign(column=self.frame.feature + ":" + self.frame.property)
        return f.pivot(index="layer", columns="column", values=value)[self.columns]

    def majority(self) -> pd.Series:
        """The majority baseline per `feature:property` (the same at every layer: same labels, same folds)."""
        return self.table("majority").iloc[0]

    def bottleneck(self) -> pd.DataFrame:
        """Per `feature:property`: the best layer below the projector's, its accuracy, the accuracy at
        the projector's layer, and the drop between them (positive: detail lost on the way up)."""
        acc = self.table()
        below = acc[acc.index < self.projector_layer]
        rows = []
        for col in acc.columns:
            at = acc[col].get(self.projector_layer, math.nan)
            best = below[col].idxmax() if len(below) and below[col].notna().any() else None
            best_acc = float(below[col].max()) if best is not None else math.nan
            rows.append(
                {
                    "column": col,
                    "best_shallow_layer": best,
                    "best_shallow_accuracy": best_acc,
                    "projector_layer": self.projector_layer,
                    "projector_accuracy": float(at),
                    "drop": best_acc - float(at),
                    "majority": float(self.majority()[col]),
                }
            )
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        """Everything as plain JSON (NaN -> null)."""

        def clean(records: list[dict]) -> list[dict]:
            return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]

        return {
            **self.meta,
            "properties": self.columns,
            "skipped": self.skipped,
            "results": clean(self.frame.to_dict("records")),
            "bottleneck": clean(self.bottleneck().to_dict("records")),
        }

    def above_baseline(self) -> pd.DataFrame:
        """Layers x `feature:property`: how far each accuracy climbs from the majority baseline toward 1,
        `(accuracy - majority) / (1 - majority)`, clipped to [0, 1] (0: at or below the baseline)."""
        acc, maj = self.table(), self.majority()
        return ((acc - maj) / (1 - maj).clip(lower=1e-9)).clip(0.0, 1.0)

    def figure(self, title: str | None = None):
        """Plotly heatmap, layers x `feature:property`, coloured by the accuracy above the majority
        baseline (`above_baseline`: a property at its baseline is dark whatever its raw accuracy), the
        accuracy written in each cell, the projector's layer outlined and the baseline as a last row."""
        import plotly.graph_objects as go

        from cliviz.analyses.heatmaps import SEQUENTIAL

        acc, maj = self.table(), self.majority()
        raw = np.vstack([acc.to_numpy(), maj.to_numpy()[None]])  # [layers + 1, columns]: the baseline last
        z = np.vstack([self.above_baseline().to_numpy(), np.zeros((1, len(maj)))])
        labels = [f"V{k}" + (" (projector)" if k == self.projector_layer else "") for k in acc.index] + ["majority"]
        text = [[f"{v:.2f}" for v in row] for row in raw]
        ctrl = self.table("control").max() if "control" in self.frame else None
        hover = [
            [
                f"{c}<br>{name}: {v:.3f}<br>majority {maj[c]:.3f}"
                + (
                    f"<br>permuted-label control (best layer) {ctrl[c]:.3f}"
                    if ctrl is not None and ctrl[c] == ctrl[c]
                    else ""
                )
                for c, v in zip(acc.columns, row)
            ]
            for name, row in zip(labels, raw)
        ]
        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=acc.columns,
                y=labels,
                zmin=0,
                zmax=1,
                colorscale=SEQUENTIAL,
                text=text,
                texttemplate="%{text}",
                textfont={"size": 8},
                hovertext=hover,
                hoverinfo="text",
                colorbar={"title": {"text": "above majority<br>(0 baseline,<br>1 perfect)"}},
            )
        )
        if self.projector_layer in acc.index:
            row = list(acc.index).index(self.projector_layer)
            fig.add_shape(
                type="rect",
                xref="paper",
                yref="y",
                x0=0,
                x1=1,
                y0=row - 0.5,
                y1=row + 0.5,
                line={"color": "#D55E00", "width": 2},
                fillcolor="rgba(0,0,0,0)",
            )
        fig.add_hline(y=len(acc) - 0.5, line={"color": "white", "width": 3})  # the baseline row apart
        fig.update_layout(
            xaxis={"title": "feature:property", "tickangle": -45, "side": "bottom"},
            yaxis={"title": "vision layer (hidden state)", "autorange": "reversed"},
            title=title,
        )
        return fig


def write_report(
    report: ProbeReport,
    out,
    formats: Sequence[str] = ("png", "svg"),
    *,
    title: str | None = None,
    png_scale: float = 3.0,
) -> list:
    """`out/probes.csv` (the tidy frame), `probes.json` (`to_json`), `probes.html` (the interactive
    heatmap) and the heatmap in `formats` (pdf / svg / png) through the figure set's kaleido session.
    The numbers are written first, so a failing browser costs only the images."""
    import json

    from cliviz.analyses.figures import kaleido_session, prepare_out_dir, style_figure
    from cliviz.atomic import atomic_write_bytes

    folder = prepare_out_dir(out)
    written = []
    payload = {
        "probes.csv": report.frame.to_csv(index=False, float_format="%.6g").encode(),
        "probes.json": (json.dumps(report.to_json(), indent=1) + "\n").encode(),
    }
    fig = report.figure(title)
    width, height = max(480, 140 + 34 * len(report.columns)), max(260, 196 + 26 * len(report.table()))
    style_figure(fig, width, height, title=title, titles=title is not None, legend=False)
    fig.update_layout(margin={"l": 120, "b": 120})
    payload["probes.html"] = fig.to_html(include_plotlyjs=True, full_html=True).encode()
    for name, data in payload.items():
        atomic_write_bytes(folder / name, data, name)
        written.append(folder / name)
    if formats:
        with kaleido_session() as session:
            for fmt in formats:
                data = session.render(fig, fmt, width, height, png_scale if fmt == "png" else 1.0)
                atomic_write_bytes(folder / f"probes.{fmt}", data, f"probes.{fmt}")
                written.append(folder / f"probes.{fmt}")
    return written
