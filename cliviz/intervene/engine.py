"""The engine: every (sample, condition) of an ablation study in a few batched, prefix-sharing forwards.

**Why one batched forward is exact.** Scoring is teacher-forced (`layout`): the prompt plus the
reference answer go through the model once, and the answer's log-probability is read at the
positions that predict it. A decoder is causal and every row of a batch is independent, so N
samples x C conditions can be stacked along the batch dimension (left-padded, with position ids
from the attention mask so that padding shifts nothing) and run as one forward per chunk of at most
`max_batch` rows, in a single nnsight invoke. Each row carries its own intervention
(`interventions`): rows with no intervention at a layer pass through it bit for bit.
`naive_knockout_grid` is the Python loop of one forward per (condition, sample); the tests hold
the two equal to 1e-5.

**Prefix sharing.** An ablation that first acts at injection layer j leaves everything before that
layer's gate as it was: the vision tower, AMP, the decoder layers below `injection_layers[j]` and
the AGF reads of layer j are the unablated run's. The unablated reference runs first (one row per
sample, per block of samples) and keeps exactly those values (`_Cache`); each chunk then holds rows
that first act at the same layer and hands the kept values to nnsight's `skip` (`_Skip`) instead
of recomputing them. Only the layers an ablation can change are run per row — on the bundled
architecture a full grid runs about 2.4x faster than plain stacked forwards
(`benchmarks/bench_ablate.py`; what remains is the layers above the knocked-out one, which no
exact method can avoid). LLaVA-OneVision shares the same way: its tower runs on anyres crops,
not samples, so a sample's kept tower states are its crops (`_crop_counts`); its memories differ in
length, so a sample's kept keys and values are its real positions, padded again to the longest of
each chunk (`_kv_lengths`; padding is masked, as in a plain batch). The kept values are bounded by
`CACHE_BUDGET_BYTES` per block; past it the engine falls back to plain stacked forwards. The same
reference run (`Reference`) also gives `mean`/`patch` their gates, the gate mass at the answer
positions (for `faithfulness`) and the model's own answer, which every condition is compared against.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nnsight
import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from cliviz.errors import CLIVizError
from cliviz.intervene.envoy import envoy
from cliviz.intervene.interventions import LayerOps, apply_ablation, chunk_ops, means_for
from cliviz.intervene.layout import (
    Batch,
    Sample,
    layout_samples,
    make_batch,
    own_answers,
    pad_into,
    suppressed,
)
from cliviz.intervene.measures import score_row, scores_frame
from cliviz.intervene.spec import Ablation, Plan, make_plan, n_slots
from cliviz.model import processing
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.model.processing import ImageInputs, image_inputs, n_image_tokens

CACHE_BUDGET_BYTES = 1 << 30  # reference values kept for prefix sharing, per block of samples


@dataclass
class _Want:
    """What a reference forward keeps besides the logits."""

    gates: bool = False
    vision: bool = False  # the vision hidden state the projector reads (per tower row: image or crop)
    memory: bool = False  # AMP output (not needed when the read's keys and values are kept)
    hidden_after: frozenset = frozenset()  # decoder layers whose output to keep
    reads: frozenset = frozenset()  # injection positions whose AGF reads to keep
    kv: bool = False  # the read's keys and values of the visual memory (the same for every condition)


@dataclass
class _Skip:
    """What a chunk takes from the reference run instead of recomputing it (nnsight `skip`).

    Every row of the chunk first changes something at injection position `j`: up to the gate of
    that layer it is the unablated run, so the vision tower, AMP, decoder layers `0..n_layers-1`
    (`n_layers = injection_layers[j]`) and the reads of AGF `j` are the reference run's values."""

    j: int
    n_layers: int
    hidden: torch.Tensor | None  # [R, W, D] output of decoder layer n_layers - 1
    reads: torch.Tensor | None  # [R, W, K, r] reads of AGF j
    vision: Any  # vision-tower output stand-in (X tower rows: R images, or their crops), or None
    memory: torch.Tensor | None  # [X, K, n, D] AMP output (or a zero stand-in when nothing reads it), or None
    kv: Any = None  # the read's keys and values (`_keys_values` layout), or None


def _keys_values(wrapped, model, store: dict | None, replacement: Any) -> None:
    """Inside a trace: the read's keys and values of the visual memory, which the model computes once,
    before any decoder layer — keep them (`store["kv"]`) or put kept ones back (`replacement`).

    Light read: the output of `read_kv`, a (keys, values) pair shared by every layer. Full read:
    each layer's own `read.key` / `read.value` outputs, in the order the model calls them."""
    if model.read_kv is not None:
        if replacement is not None:
            wrapped.read_kv.skip(replacement)
        elif store is not None:
            store["kv"] = wrapped.read_kv.output
        return
    for j in range(len(model.agf)):
        read = wrapped.agf[j].read
        if replacement is not None:
            read.key.skip(replacement[j][0])
            read.value.skip(replacement[j][1])
        elif store is not None:
            store["kv"][j] = (read.key.output, read.value.output)


def _forward(
    model,
    batch: Batch,
    pixels: ImageInputs,
    ops: list[LayerOps | None] | None = None,
    skip: _Skip | None = None,
    want: _Want | None = None,
) -> dict:
    """One traced forward of a chunk: skips, interventions per layer, logits at the scored positions."""
    wrapped = envoy(model)
    want = want or _Want()
    inj_at = {layer: j for j, layer in enumerate(model.config.injection_layers)}
    n_dec = len(model.decoder_layers)
    vfl = model.config.base_config.vision_feature_layer
    position_ids = (batch.mask.cumsum(-1) - 1).clamp(min=0)
    zero = torch.zeros((), device=model.device, dtype=model.dtype)
    store = None  # only saved values leave an nnsight trace: fill a saved dict inside
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with wrapped.trace(
            input_ids=batch.ids,
            attention_mask=batch.mask,
            position_ids=position_ids,
            **pixels.to_model(model.device, model.dtype),
        ):
            store = nnsight.save({"gates": [], "hidden": {}, "reads": {}, "kv": {}})
            tower = wrapped.base.model.vision_tower
            if want.vision:
                store["vision"] = tower.output.hidden_states[vfl]
            elif skip is not None and skip.vision is not None:
                tower.skip(skip.vision)
            if model.amp is not None:
                if want.memory:
                    store["memory"] = wrapped.amp.output
                elif skip is not None and skip.memory is not None:
                    wrapped.amp.skip(skip.memory)
                _keys_values(wrapped, model, store if want.kv else None, skip.kv if skip is not None else None)
            layers = wrapped.base.model.language_model.layers
            for layer in range(n_dec):
                j = inj_at.get(layer)
                if j is not None:
                    if skip is not None and j < skip.j:
                        wrapped.agf[j].skip(zero)  # its decoder layer is skipped: the update is never used
                    else:
                        apply_ablation(
                            wrapped,
                            j,
                            ops[j] if ops is not None else None,
                            store["gates"] if want.gates else None,
                            reads_saved=store["reads"] if j in want.reads else None,
                            reads_replacement=skip.reads if skip is not None and j == skip.j else None,
                        )
                if skip is not None and layer < skip.n_layers:
                    layers[layer].skip(skip.hidden)  # only the last skipped layer's value is ever read
                elif layer in want.hidden_after:
                    store["hidden"][layer] = layers[layer].output
            store["logits"] = wrapped.base.lm_head.output[batch.gather_rows, batch.gather_pos].float()
    return store


@dataclass
class Reference:
    """What the unablated run of every sample gives the conditions: own answers, gates, gate mass."""

    own: np.ndarray  # [N] own (unablated) argmax at the first answer position
    logprobs: list  # per sample [n_answer, V] log-probs (first row used for flips)
    gate_mass: np.ndarray | None  # [N, L, K] mean gates over the answer positions
    token_sums: dict[str, tuple[np.ndarray, np.ndarray]]  # tokens -> ([N, L, K] sums, [N] counts)
    gates: list | None  # per sample [L, T_s, K] (only when a patch needs them)
    filled: np.ndarray  # [N] bool: scores of this sample are in


def _new_reference(model, n: int, token_sets: set[str], keep_gates: bool) -> Reference:
    """An empty `Reference` for `n` samples (token sums for `token_sets` and `answer`; gates if asked)."""
    n_layers = len(model.agf)
    k = n_slots(model) if n_layers else 0
    sets = set(token_sets) | {"answer"}
    return Reference(
        own=np.zeros(n, dtype=np.int64),
        logprobs=[None] * n,
        gate_mass=np.zeros((n, n_layers, k)) if n_layers else None,
        token_sums={t: (np.zeros((n, n_layers, k)), np.zeros(n)) for t in sets} if n_layers else {},
        gates=[None] * n if keep_gates else None,
        filled=np.zeros(n, dtype=bool),
    )


@dataclass
class _Cache:
    """Reference values per sample (unpadded), for the `_Skip`s of the chunks of one block."""

    vision: dict = field(default_factory=dict)  # s -> [C_s, P(+1), Dv]: its C_s tower rows (1, or its crops)
    memory: dict = field(default_factory=dict)  # s -> [C_s, K, n, D]
    hidden: dict = field(default_factory=dict)  # (s, decoder layer) -> [T_s, D]
    reads: dict = field(default_factory=dict)  # (s, j) -> [T_s, K, r]
    kv: dict = field(default_factory=dict)  # s -> the read's keys and values of its memory (one row, real positions)
    n_vision_states: int = 0


def _crop_counts(model, pixels: ImageInputs) -> list[int]:
    """Rows of the vision tower's batch per sample: 1 for LLaVA; LLaVA-OneVision's anyres crops (base
    crop plus grid, as `get_image_features` cuts them from the padded `[B, max_crops, ...]` pixels)."""
    if pixels.image_sizes is None:
        return [1] * len(pixels.token_counts)
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config.base_config
    return [
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in pixels.image_sizes.tolist()
    ]


def _kv_lengths(model, pixels: ImageInputs) -> list[int] | None:
    """Real memory positions of each sample's read keys and values, or None when every memory is as
    long as the next (LLaVA). OneVision packs as many memory positions as the image has tokens, the
    light read pools each to at most `read_max_tokens` (`pool_memory`), and a batch pads the rest."""
    if pixels.image_sizes is None:
        return None
    cap = model.config.read_max_tokens if model.read_kv is not None else None
    return [n if cap is None else min(n, cap) for n in pixels.token_counts]


def _reference_pass(
    model,
    samples: list[Sample],
    which: list[int],
    pixels: ImageInputs,
    ref: Reference,
    suppress: list[int],
    pad_id: int,
    *,
    max_batch: int,
    want_cache: _Want | None,
    progress: Callable[[int], None] | None,
) -> _Cache:
    """Unablated forwards of `which` (chunks of max_batch): fill `ref` for samples not filled yet and
    keep what `want_cache` asks for."""
    n_layers = len(model.agf)
    image_id = model.image_token_id
    cache = _Cache(n_vision_states=model.config.base_config.vision_config.num_hidden_layers + 1)
    crops = _crop_counts(model, pixels)
    kv_lengths = _kv_lengths(model, pixels)
    want = want_cache or _Want()
    want = _Want(
        gates=n_layers > 0,
        vision=want.vision,
        memory=want.memory,
        hidden_after=want.hidden_after,
        reads=want.reads,
        kv=want.kv,
    )
    for start in range(0, len(which), max_batch):
        chunk = which[start : start + max_batch]
        batch = make_batch(samples, chunk, pad_id, model.device)
        store = _forward(model, batch, pixels.select(chunk), want=want)
        lp = torch.log_softmax(store["logits"], dim=-1).cpu()
        masked = lp.clone()
        masked[:, suppress] = -math.inf
        g = torch.stack(list(store["gates"]), dim=1).cpu().numpy() if n_layers else None  # [R, L, W, K]
        fresh = 0
        rows_of_tower = [crops[s] for s in chunk]  # the tower's batch holds each sample's crops in turn
        vision = torch.split(store["vision"], rows_of_tower) if want.vision else None  # each [C_s, P, Dv]
        memory = torch.split(store["memory"], rows_of_tower) if want.memory else None  # each [C_s, K, n, D]
        for r, s in enumerate(chunk):
            off = int(batch.offsets[r])
            if want_cache is not None:
                if vision is not None:
                    cache.vision[s] = vision[r]
                if memory is not None:
                    cache.memory[s] = memory[r]
                for layer in want.hidden_after:
                    cache.hidden[(s, layer)] = store["hidden"][layer][r, off:]
                for j in want.reads:
                    cache.reads[(s, j)] = store["reads"][j][r, off:]
                if want.kv:
                    cache.kv[s] = _row_of(store["kv"], r, None if kv_lengths is None else kv_lengths[s])
            if ref.filled[s]:
                continue
            fresh += 1
            a, b = batch.spans[r]
            ref.logprobs[s] = lp[a:b].numpy()
            ref.own[s] = int(masked[a].argmax())
            if g is not None and ref.gate_mass is not None:  # a model with gates
                row = g[r, :, off:]  # [L, T_s, K]
                for t, (sums, counts) in ref.token_sums.items():
                    m = samples[s].token_mask(t, image_id)
                    sums[s] = row[:, m].sum(axis=1)
                    counts[s] = m.sum()
                sums, counts = ref.token_sums["answer"]
                ref.gate_mass[s] = sums[s] / max(counts[s], 1)
                if ref.gates is not None:
                    ref.gates[s] = row.astype(np.float32)
            ref.filled[s] = True
        if progress and fresh:
            progress(fresh)
    return cache


def _make_skip(model, cache: _Cache, rows: list[tuple[int, int]], j: int, batch: Batch, want: _Want) -> _Skip:
    """The cached prefix of a chunk whose rows first act at injection position `j`, padded like `batch`."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    width = batch.ids.shape[1]
    which = [s for s, _ in rows]
    n_layers = model.config.injection_layers[j]
    hidden = pad_into([cache.hidden[(s, n_layers - 1)] for s in which], width) if n_layers > 0 else None
    reads = pad_into([cache.reads[(s, j)] for s in which], width) if j in want.reads else None
    kv = _stack_rows([cache.kv[s] for s in which]) if want.kv else None
    real = torch.cat([cache.vision[s] for s in which]) if want.vision else None  # [X, P, Dv]: X tower rows
    memory = None
    if want.memory:
        memory = torch.cat([cache.memory[s] for s in which])  # [X, K, n, D]
    elif kv is not None and real is not None and model.amp is not None:
        # AMP's output is read only through the keys and values of the read: when those are put back
        # from the cache, a zero stand-in of the right shape is enough (OneVision packs it, shape only).
        cls = 1 if model.config.base_config.vision_feature_select_strategy == "default" else 0
        shape = (
            real.shape[0],
            len(model.config.vision_layers),
            real.shape[1] - cls,
            model.config.base_config.text_config.hidden_size,
        )
        memory = torch.zeros((), dtype=model.dtype, device=real.device).expand(shape)
    vision = None
    if real is not None:
        blank = torch.zeros((), dtype=real.dtype, device=real.device).expand(real.shape)  # AMP is skipped: shape only
        vfl = model.config.base_config.vision_feature_layer % cache.n_vision_states
        states = tuple(real if i == vfl else blank for i in range(cache.n_vision_states))
        vision = BaseModelOutputWithPooling(last_hidden_state=blank, pooler_output=None, hidden_states=states)
    return _Skip(j, n_layers if hidden is not None else 0, hidden, reads, vision, memory, kv)


def _row_of(kv: Any, r: int, length: int | None = None) -> Any:
    """Row r of the read's keys and values: a (keys, values) pair, or a dict of them per layer (full
    read); with `length`, only its first `length` memory positions (axis 1 of a row; the rest pads)."""
    cut = slice(None) if length is None else slice(0, length)
    if isinstance(kv, dict):
        return [(kv[j][0][r, :, cut], kv[j][1][r, :, cut]) for j in sorted(kv)]
    return kv[0][r, :, cut], kv[1][r, :, cut]


def _stack_rows(rows: list) -> Any:
    """Rows of `_row_of` stacked back into a batch, in the layout `_keys_values` puts back."""
    if isinstance(rows[0], list):
        return [
            (_stack_padded([row[j][0] for row in rows]), _stack_padded([row[j][1] for row in rows]))
            for j in range(len(rows[0]))
        ]
    return _stack_padded([row[0] for row in rows]), _stack_padded([row[1] for row in rows])


def _stack_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-row `[A, N_r, ...]` -> `[R, A, N, ...]`, right-padded with zeros on the memory axis to the
    longest row, as a batch pads its memories (the padded positions are masked, never read)."""
    width = max(p.shape[1] for p in parts)
    if all(p.shape[1] == width for p in parts):
        return torch.stack(parts)
    first = parts[0]
    out = first.new_zeros(len(parts), first.shape[0], width, *first.shape[2:])
    for r, part in enumerate(parts):
        out[r, :, : part.shape[1]] = part
    return out


def reference_run(
    model: CLIForConditionalGeneration,
    samples: list[Sample],
    pixels: ImageInputs,
    suppress: list[int],
    pad_id: int,
    *,
    max_batch: int,
    token_sets: set[str],
    keep_gates: bool,
    progress: Callable[[int], None] | None,
) -> Reference:
    """The unablated forward of every sample, nothing cached (`mean_gates`)."""
    ref = _new_reference(model, len(samples), token_sets, keep_gates)
    _reference_pass(
        model,
        samples,
        list(range(len(samples))),
        pixels,
        ref,
        suppress,
        pad_id,
        max_batch=max_batch,
        want_cache=None,
        progress=progress,
    )
    return ref


def _cache_plan(
    model,
    samples: list[Sample],
    plans: dict[int, Plan],
    max_batch: int,
    share_prefix: bool,
    crops: list[int],
    kv_lengths: list[int] | None,
) -> tuple[_Want | None, int]:
    """What to keep from the reference run for prefix sharing, and how many samples per block.

    `crops`: the vision tower's rows per sample (`_crop_counts`); `kv_lengths`: the memory positions
    of each sample's read (`_kv_lengths`; None: `n_image_tokens` for every sample)."""
    n = len(samples)
    if not share_prefix or not plans:
        return None, n
    cfg = model.config
    firsts = {min(p.layers) for p in plans.values()}
    per_group = max(sum(1 for p in plans.values() if min(p.layers) == g) for g in firsts)
    hidden_after = frozenset(cfg.injection_layers[g] - 1 for g in firsts if cfg.injection_layers[g] > 0)
    reads = frozenset(g for g in firsts if hasattr(model.agf[g], "read"))
    # every AGF read recomputes attention from changed hidden states, but the keys and values of
    # the visual memory are the same for all conditions of a sample: computed once, reused (and
    # then AMP's output is not needed: a stand-in of its shape goes in its place)
    kv = model.amp is not None
    vc, tc = cfg.base_config.vision_config, cfg.base_config.text_config
    t = max(len(s.fed) for s in samples)
    n_img = n_image_tokens(cfg)  # memory positions per tower row (image or crop)
    n_read = max(kv_lengths) if kv_lengths else n_img  # memory positions of the longest read
    rows = max(crops)  # tower rows of the largest sample
    k = n_slots(model)
    elem = torch.finfo(model.dtype).bits // 8
    shared = rows * vc.hidden_size * (n_img + 1) + len(hidden_after) * t * tc.hidden_size  # per sample
    kv_copies = 1 if model.read_kv is not None else len(model.agf)
    size = shared + len(reads) * t * k * cfg.read_width + (kv_copies * 2 * k * n_read * cfg.read_width if kv else 0)
    if size * elem > CACHE_BUDGET_BYTES:  # AMP's output instead: the read runs again per chunk
        reads, kv = frozenset(), False
        size = shared + (rows * k * n_img * tc.hidden_size if model.amp is not None else 0)
    if size * elem > CACHE_BUDGET_BYTES:
        return None, n
    block = max(1, min(n, max_batch // per_group, CACHE_BUDGET_BYTES // (size * elem)))
    memory = model.amp is not None and not kv
    return _Want(vision=True, memory=memory, hidden_after=hidden_after, reads=reads, kv=kv), block


def run_conditions(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    references: Sequence[str | None] | None,
    conditions: Sequence[Ablation | None],
    *,
    qtypes: Sequence[str | None] | None = None,
    max_batch: int = 256,
    progress: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> tuple[pd.DataFrame, Reference]:
    """The engine's entry point: the scores frame of every (sample, condition) (`measures.scores_frame`)
    and the reference run it was measured against. `progress(n)` is told of every n rows done."""
    n = len(questions)
    if n == 0:
        raise CLIVizError("no samples to score")
    if len(images) != n or any(x is not None and len(x) != n for x in (references, qtypes)):
        raise CLIVizError("images, questions, references and qtypes must have the same length")
    if max_batch < 1:
        raise CLIVizError("max_batch must be at least 1")
    conditions = list(conditions)
    plans = {c: make_plan(a, model) for c, a in enumerate(conditions) if a is not None}
    computed_means = [p for p in plans.values() if p.ablation.kind == "mean" and p.ablation.means is None]
    if qtypes is None and any(p.ablation.per_qtype for p in computed_means):
        raise CLIVizError("a per-question-type mean ablation needs the question types (qtypes)")
    pixels = image_inputs(list(images), model.config)
    refs = own_answers(model, tokenizer, images, questions, references)
    samples = layout_samples(model, tokenizer, questions, refs, qtypes, pixels.token_counts)
    suppress = suppressed(tokenizer)
    pad_id = processing.pad_id(tokenizer)
    token_sets = {p.ablation.tokens for p in computed_means}
    keep_gates = any(p.ablation.kind == "patch" for p in plans.values())
    ref = _new_reference(model, n, token_sets, keep_gates)
    if token_sets or keep_gates:  # means / donors come from every sample: a full reference pass first
        _reference_pass(
            model,
            samples,
            list(range(n)),
            pixels,
            ref,
            suppress,
            pad_id,
            max_batch=max_batch,
            want_cache=None,
            progress=progress,
        )
    means = {c: means_for(p, ref, samples) for c, p in plans.items() if p.ablation.kind == "mean"}
    results = _score_blocks(
        model,
        samples,
        plans,
        pixels,
        ref,
        means,
        suppress,
        pad_id,
        max_batch=max_batch,
        progress=progress,
        share_prefix=share_prefix,
    )
    frame = scores_frame(tokenizer, samples, conditions, questions, qtypes, ref.own, ref.logprobs, results, suppress)
    return frame, ref


def _score_blocks(
    model,
    samples: list[Sample],
    plans: dict[int, Plan],
    pixels: ImageInputs,
    ref: Reference,
    means: dict[int, Any],
    suppress: list[int],
    pad_id: int,
    *,
    max_batch: int,
    progress: Callable[[int], None] | None,
    share_prefix: bool,
) -> dict[tuple[int, int], dict]:
    """`score_row` of every ablated (sample, condition): block by block of samples, the reference
    pass that fills `ref` and keeps the block's prefixes, then its chunks grouped by first layer."""
    n = len(samples)
    n_layers = len(model.agf)
    k = n_slots(model) if n_layers else 0
    image_id = model.image_token_id
    crops, kv_lengths = _crop_counts(model, pixels), _kv_lengths(model, pixels)
    want, block = _cache_plan(model, samples, plans, max_batch, share_prefix, crops, kv_lengths)
    results: dict[tuple[int, int], dict[str, Any]] = {}
    for b0 in range(0, n, block):
        block_samples = list(range(b0, min(n, b0 + block)))
        cache = _reference_pass(
            model,
            samples,
            block_samples,
            pixels,
            ref,
            suppress,
            pad_id,
            max_batch=max_batch,
            want_cache=want,
            progress=progress,
        )
        if want is not None:  # one row group per first-touched layer, each with its own skips
            groups: dict[int, list[tuple[int, int]]] = {}
            for c, p in plans.items():
                groups.setdefault(min(p.layers), []).extend((s, c) for s in block_samples)
            todo: list[tuple[int | None, list[tuple[int, int]]]] = list(sorted(groups.items()))
        else:
            todo = [(None, [(s, c) for s in block_samples for c in plans])]
        for g, group_rows in todo:
            group_rows.sort()
            for start in range(0, len(group_rows), max_batch):
                rows = group_rows[start : start + max_batch]
                which = [s for s, _ in rows]
                batch = make_batch(samples, which, pad_id, model.device)
                ops = chunk_ops(
                    rows, plans, batch, samples, ref, means, n_layers, k, image_id, model.device, model.config
                )
                skip = _make_skip(model, cache, rows, g, batch, want) if g is not None and want is not None else None
                store = _forward(model, batch, pixels.select(which), ops, skip=skip)
                lp = torch.log_softmax(store["logits"], dim=-1).cpu().numpy()
                for r, (s, c) in enumerate(rows):
                    a_, b_ = batch.spans[r]
                    results[(s, c)] = score_row(lp[a_:b_], samples[s], int(ref.own[s]), suppress)
                if progress:
                    progress(len(rows))
        del cache
    return results
