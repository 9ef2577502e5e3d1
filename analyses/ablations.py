"""Ablations: change what a CLI model's gates (or injections) do, and measure what the answer loses.

The gates say *where* each LLM layer reads vision from; they do not say whether the model *uses*
what it reads. An ablation answers that causally: run the model again with one part of the fusion
replaced, and compare the answer's log-probability, its argmax and its accuracy with the unablated
run. Everything here intervenes on the two hook points every cliviz analysis shares, through
nnsight (`cliviz.tracing.record.envoy`): the gate module `agf.<j>.gate` (output `[B, T, K]`, a
softmax over the K selected vision layers) and the injection module `agf.<j>.injection` (output
`[B, T, D]`, the residual update `tanh(alpha) W_o sum_k g_k c_k` of LLM layer
`config.injection_layers[j]`).

Kinds of ablation (`Ablation.kind`), each applied at the chosen LLM layers and token positions:

- ``knockout``: set the gates of the chosen vision layers to 0 and renormalise the rest, so the
  layer reads only from the other vision layers with the same total weight (`g'_k = g_k 1[k not in
  S] / sum_{k' not in S} g_k'`). It asks "what if this LLM layer could not see vision layer k?".
  If every bit of weight was on the knocked-out layers (a static one-hot gate), nothing is left to
  renormalise and the gate becomes 0 (nothing is injected).
- ``zero``: set those gates to 0 *without* renormalising (all of them when no vision layer is
  given): removes the contribution and shrinks the injection.
- ``uniform``: replace the gate by the uniform distribution over the chosen vision layers (all K by
  default): keeps the reads, removes the choice.
- ``onehot``: force the gate onto one vision layer (`value`, a real hidden_states index): the static
  one-to-one wiring of the `shallow` baseline, at that layer.
- ``mean``: replace every token's gate by the data-set mean gate of that LLM layer (token-pooled
  over the same token set, optionally per question type). Dynamic, token-specific gating matters
  exactly as much as this ablation hurts. Means are given (`Ablation.means`, `[L, K]` or
  `{qtype: [L, K]}`) or computed from the unablated runs of the samples being scored.
- ``injection_off``: zero the injection module's output: that LLM layer receives nothing extra
  (with every layer off, a CLI model is its base LLaVA model).
- ``patch``: put in the gates of a donor sample's unablated run (`value` = donor index, default the
  next sample), aligned by role: image tokens by position, question tokens from the end of the
  prompt (the token that predicts the answer meets its counterpart), answer tokens by step.
  Positions without a counterpart keep their own gates.

Token sets (`Ablation.tokens`): ``all`` (every real token), ``prompt`` (`<bos>` and question
words), ``image`` (image placeholders), ``answer`` (the position(s) whose output predicts the
answer: the last prompt token, then each fed answer token but the last).

**Why one batched forward is exact.** Scoring is teacher-forced: the prompt plus the reference
answer go through the model once, and the answer's log-probability is read at the positions that
predict it. A decoder is causal and every row of a batch is independent, so N samples x C
conditions can be stacked along the batch dimension (left-padded, with position ids from the
attention mask so that padding shifts nothing) and run as one forward per chunk of at most
`max_batch` rows, in a single nnsight invoke. Each row carries its own intervention: at every gate
module the chunk's gates are rewritten row by row with precomputed masks (`keep`, renormalise,
fill) in one vectorised expression, so rows with no intervention at that layer pass through
bit-for-bit. `naive_knockout_grid` is the Python loop of one forward per (condition, sample); the
tests hold the two equal to 1e-5.

**Prefix sharing.** An ablation that first acts at injection layer j leaves everything before that
layer's gate as it was: the vision tower, AMP, the decoder layers below `injection_layers[j]` and
the AGF reads of layer j are the unablated run's. The unablated reference runs first (one row per
sample, per block of samples) and keeps exactly those values; each chunk then holds rows that
first act at the same layer and hands the kept values to nnsight's `skip` instead of recomputing
them. Only the layers an ablation can change are run per row — on the bundled architecture a
full grid runs about 2.4x faster than plain stacked forwards (`benchmarks/bench_ablate.py`; what
remains is the layers above the knocked-out one, which no exact method can avoid). The kept values are bounded by
`CACHE_BUDGET_BYTES` per block; past it the engine falls back to plain stacked forwards. The same
reference run also gives `mean`/`patch` their gates, the gate mass at the answer positions (for
`faithfulness`) and the model's own answer, which every condition is compared against.

**Measurements** per (sample, condition) (`score_conditions`): log-prob of the reference answer's
first token (and of the whole reference, teacher-forced), log-prob of the model's own unablated
answer token, the argmax answer under the condition (special tokens suppressed as in generation),
`flipped` (argmax differs from the unablated argmax) and `correct` (every reference token is the
argmax under teacher forcing). `knockout_grid` reduces these to tidy effects per (LLM layer,
vision layer) cell — changes versus the reference, with seeded bootstrap 95% CIs over samples —
and `faithfulness` asks whether the cells the gates weigh most are the ones whose removal hurts
most (Spearman rank correlation). High gate mass with no effect means the gate's choice is not
used: faithfulness must be measured, not assumed.

Example::

    from cliviz.analyses.ablations import Ablation, score_conditions, knockout_grid
    scores = score_conditions(model, tok, images, questions, answers,
                              [None, Ablation("knockout", llm_layers=[2], vision_layers=[3])])
    grid = knockout_grid(model, tok, images, questions, answers, qtypes=qtypes)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nnsight
import numpy as np
import pandas as pd
import torch
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.model.processing import n_image_tokens, pixel_values, prompt_ids
from cliviz.tracing.record import envoy

__all__ = [
    "KINDS", "TOKEN_SETS", "GRID_METRICS", "REFERENCE", "Ablation", "apply_gate_ablation", "check_conditions",
    "score_conditions", "score_with_gate_mass", "effects_frame", "grid_conditions", "knockout_grid",
    "naive_knockout_grid", "grid_matrix", "single_cell", "faithfulness", "mean_gates",
]

KINDS = ("knockout", "zero", "uniform", "onehot", "mean", "injection_off", "patch")
TOKEN_SETS = ("all", "prompt", "image", "answer")
# Per-sample quantities the effects frame averages, and what each row of a grid reports.
GRID_METRICS = ("delta_logprob_ref", "delta_logprob_own", "flip_rate", "accuracy", "delta_accuracy", "gate_mass")
REFERENCE = "reference"
ALL = "all"

_ROLE_PROMPT, _ROLE_ANSWER = 1, 3


# ================================================================================= the ablation spec

@dataclass
class Ablation:
    """One intervention on the fusion. Layers are the model's REAL indices:
    `llm_layers` from `config.injection_layers` (None = every injection layer) and
    `vision_layers` from `config.vision_layers` (hidden_states indices).

    `tokens`: where to intervene — all | prompt | image | answer (the position(s) predicting the
    answer). `value`: the forced vision layer for ``onehot`` (real index); the donor sample index for
    ``patch`` (default: the next sample). `means` / `per_qtype`: for ``mean`` only (see the module
    docstring). `name`: the condition's label in result frames (default: `label`).
    """

    kind: str
    llm_layers: list[int] | None = None
    vision_layers: list[int] | None = None
    tokens: str = "all"
    value: int | None = None
    name: str | None = None
    means: Any = None  # [L, K] array, or {qtype: [L, K]}; None = computed from the unablated runs
    per_qtype: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CLIVizError(f"unknown ablation kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.tokens not in TOKEN_SETS:
            raise CLIVizError(f"unknown token set {self.tokens!r}; use one of {', '.join(TOKEN_SETS)}")
        self.llm_layers = None if self.llm_layers is None else [int(i) for i in self.llm_layers]
        self.vision_layers = None if self.vision_layers is None else [int(k) for k in self.vision_layers]
        if self.llm_layers is not None and not self.llm_layers:
            raise CLIVizError("llm_layers is empty (use None for every injection layer)")
        if self.vision_layers is not None and not self.vision_layers:
            raise CLIVizError("vision_layers is empty (use None for every vision layer)")
        if self.kind == "knockout" and self.vision_layers is None:
            raise CLIVizError("a knockout needs the vision layer(s) to knock out (vision_layers)")
        if self.kind == "onehot" and self.value is None:
            if self.vision_layers is not None and len(self.vision_layers) == 1:
                self.value = self.vision_layers[0]
            else:
                raise CLIVizError("a onehot ablation needs the vision layer to force (value)")
        if self.kind in ("injection_off", "mean", "patch") and self.vision_layers is not None:
            raise CLIVizError(f"a {self.kind} ablation takes no vision layers (it acts on the whole gate)")

    @property
    def label(self) -> str:
        """`name`, or a readable description: `knockout L2 V3`, `injection_off L1,2,3 @answer`."""
        if self.name:
            return self.name
        parts = [self.kind]
        parts.append("L*" if self.llm_layers is None else "L" + ",".join(map(str, self.llm_layers)))
        if self.vision_layers is not None:
            parts.append("V" + ",".join(map(str, self.vision_layers)))
        if self.kind == "onehot":
            parts.append(f"->V{self.value}")
        if self.kind == "patch":
            parts.append("donor=next" if self.value is None else f"donor={self.value}")
        if self.kind == "mean" and self.per_qtype:
            parts.append("per-qtype")
        if self.tokens != "all":
            parts.append(f"@{self.tokens}")
        return " ".join(parts)


def _position(values: Sequence[int], real: int, what: str) -> int:
    try:
        return list(values).index(int(real))
    except ValueError:
        raise CLIVizError(f"{what} {real} is not in this model ({what}s: {', '.join(map(str, values)) or 'none'})") from None


@dataclass
class _Plan:
    """An `Ablation` mapped onto one model: positions instead of real indices, numeric fills."""

    ablation: Ablation
    layers: list[int]  # positions j into config.injection_layers
    keep: np.ndarray | None  # [K] multiplier (knockout/zero); None = the gate is replaced outright
    renorm: bool
    fill: np.ndarray | None  # [K] constant replacement (uniform/onehot)
    inj_off: bool

    @property
    def touches_gate(self) -> bool:
        return not self.inj_off


def _n_slots(model) -> int:
    """K: the width of the gate (`len(vision_layers)`; 1 for deepstack's ungated injection)."""
    gate = model.agf[0].gate
    return int(gate.n_vision) if hasattr(gate, "n_vision") else int(gate.to_logits.out_features)


def _plan(ablation: Ablation, model) -> _Plan:
    cfg = model.config
    if len(model.agf) == 0:
        raise CLIVizError(f"this model has no gates or injections (fusion={cfg.fusion}): nothing to ablate")
    inj, vis = list(cfg.injection_layers), list(cfg.vision_layers)
    k = _n_slots(model)
    layers = list(range(len(inj))) if ablation.llm_layers is None else [_position(inj, i, "LLM layer") for i in ablation.llm_layers]
    chosen = None if ablation.vision_layers is None else [_position(vis, v, "vision layer") for v in ablation.vision_layers]
    if chosen is not None and k != len(vis):  # deepstack: one ungated slot that reads the final vision layer
        chosen = [0]
    keep = fill = None
    renorm = False
    if ablation.kind in ("knockout", "zero"):
        keep = np.ones(k, dtype=np.float32)
        keep[chosen if chosen is not None else slice(None)] = 0.0
        renorm = ablation.kind == "knockout"
    elif ablation.kind == "uniform":
        idx = chosen if chosen is not None else list(range(k))
        fill = np.zeros(k, dtype=np.float32)
        fill[idx] = 1.0 / len(set(idx))
    elif ablation.kind == "onehot":
        fill = np.zeros(k, dtype=np.float32)
        forced = _position(vis, ablation.value, "vision layer")
        fill[forced if k == len(vis) else 0] = 1.0
    return _Plan(ablation, layers, keep, renorm, fill, ablation.kind == "injection_off")


# =========================================================================== the intervention itself

def apply_gate_ablation(gates: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, renorm: torch.Tensor,
                        fill: torch.Tensor) -> torch.Tensor:
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
class _LayerOps:
    gate: tuple[torch.Tensor, ...] | None = None  # (mask, keep, renorm, fill) for apply_gate_ablation
    inj_off: torch.Tensor | None = None  # [R, T] bool: zero the injection there


def apply_ablation(wrapped, j: int, ops: _LayerOps | None, saved: list | None = None, *,
                   reads_saved: dict | None = None, reads_replacement: torch.Tensor | None = None,
                   kv_saved: dict | None = None, kv_replacement: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> None:
    """Inside an nnsight trace: the chunk's interventions at injection layer `j`, in the order the
    AGF layer runs its modules — gate (rewrite, optionally keep), read (keep it, or skip it with the
    reference run's reads when they cannot have changed; or skip only its key/value maps of the
    visual memory, which no gate or hidden state can change), injection (zero it where asked)."""
    agf = wrapped.agf[j]
    if ops is not None and ops.gate is not None:
        agf.gate.output = apply_gate_ablation(agf.gate.output, *ops.gate)
    if saved is not None:
        saved.append(agf.gate.output.float())
    if reads_replacement is not None:
        agf.read.skip(reads_replacement)
    else:
        if kv_replacement is not None:
            agf.read.key.skip(kv_replacement[0])
            agf.read.value.skip(kv_replacement[1])
        elif kv_saved is not None:
            kv_saved[j] = (agf.read.key.output, agf.read.value.output)
        if reads_saved is not None:
            reads_saved[j] = agf.read.output
    if ops is not None and ops.inj_off is not None:
        out = agf.injection.output
        agf.injection.output = out.masked_fill(ops.inj_off[..., None], 0)


# ================================================================================== data layout

@dataclass
class _Sample:
    """One (image, question, reference) laid out for teacher forcing (unpadded positions)."""

    prompt: list[int]
    answer: list[int] | None  # reference ids; None = the model's own answer (decided by the reference run)
    qtype: str | None
    roles: np.ndarray = field(init=False)

    @property
    def fed(self) -> list[int]:
        return self.prompt + (self.answer[:-1] if self.answer else [])

    @property
    def n_answer(self) -> int:
        return len(self.answer) if self.answer else 1

    def __post_init__(self) -> None:
        roles = np.full(len(self.fed), _ROLE_PROMPT, dtype=np.int8)
        roles[len(self.prompt):] = _ROLE_ANSWER
        self.roles = roles

    def token_mask(self, tokens: str, image_id: int) -> np.ndarray:
        n = len(self.fed)
        if tokens == "all":
            return np.ones(n, dtype=bool)
        if tokens == "image":
            return np.asarray(self.fed) == image_id
        if tokens == "prompt":
            return (self.roles == _ROLE_PROMPT) & (np.asarray(self.fed) != image_id)
        mask = np.zeros(n, dtype=bool)  # answer: the positions whose output predicts an answer token
        start = len(self.prompt) - 1
        mask[start:start + self.n_answer] = True
        return mask


def _layout(model, tokenizer, questions: Sequence[str], references: Sequence[str | None] | None,
            qtypes: Sequence[str | None] | None) -> list[_Sample]:
    samples = []
    unk = tokenizer.unk_token_id
    for i, q in enumerate(questions):
        ref = references[i] if references is not None else None
        ids = None
        if ref is not None and str(ref).strip():
            ids = tokenizer(str(ref), add_special_tokens=False).input_ids
            if not ids:
                ids = None
            elif unk is not None and unk in ids:
                raise CLIVizError(f"reference answer {ref!r} has words outside the model's vocabulary")
        samples.append(_Sample(prompt_ids(tokenizer, q, model.config), ids, qtypes[i] if qtypes is not None else None))
    return samples


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def _suppressed(tokenizer) -> list[int]:
    """Tokens generation never emits: not answers."""
    from cliviz.inference import suppressed_tokens

    return suppressed_tokens(tokenizer)


@dataclass
class _Batch:
    ids: torch.Tensor  # [R, W]
    mask: torch.Tensor  # [R, W]
    offsets: np.ndarray  # [R] left padding of each row
    gather_rows: torch.Tensor  # [P] row of each scored position
    gather_pos: torch.Tensor  # [P] position of each scored position
    spans: list[tuple[int, int]]  # per row: slice into the P scored positions


def _batch(samples: list[_Sample], which: Sequence[int], pad_id: int, device) -> _Batch:
    fed = [samples[s].fed for s in which]
    width = max(len(f) for f in fed)
    ids = torch.full((len(fed), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(fed), width), dtype=torch.long)
    offsets = np.zeros(len(fed), dtype=np.int64)
    rows, pos, spans = [], [], []
    for r, (s, f) in enumerate(zip(which, fed)):
        off = width - len(f)
        offsets[r] = off
        ids[r, off:] = torch.tensor(f)
        mask[r, off:] = 1
        start = off + len(samples[s].prompt) - 1
        n = samples[s].n_answer
        spans.append((len(rows), len(rows) + n))
        rows += [r] * n
        pos += list(range(start, start + n))
    return _Batch(ids.to(device), mask.to(device), offsets, torch.tensor(rows, device=device),
                  torch.tensor(pos, device=device), spans)


@dataclass
class _Want:
    """What a reference forward keeps besides the logits."""

    gates: bool = False
    vision: bool = False  # the vision hidden state the LLaVA projector reads
    memory: bool = False  # AMP output
    hidden_after: frozenset = frozenset()  # decoder layers whose output to keep
    reads: frozenset = frozenset()  # injection positions whose AGF reads to keep
    kv: frozenset = frozenset()  # injection positions whose read key/value maps of the memory to keep


@dataclass
class _Skip:
    """What a chunk takes from the reference run instead of recomputing it (nnsight `skip`).

    Every row of the chunk first changes something at injection position `j`: up to the gate of
    that layer it is the unablated run, so the vision tower, AMP, decoder layers `0..n_layers-1`
    (`n_layers = injection_layers[j]`) and the reads of AGF `j` are the reference run's values."""

    j: int
    n_layers: int
    hidden: torch.Tensor | None  # [R, W, D] output of decoder layer n_layers - 1
    reads: torch.Tensor | None  # [R, W, K, D] reads of AGF j
    vision: Any  # vision-tower output stand-in, or None
    memory: torch.Tensor | None  # [R, K, N, D] AMP output (or a zero stand-in when nothing reads it), or None
    kv: dict = field(default_factory=dict)  # injection position -> ([R, K, N, D] keys, values) of its read


def _forward(model, batch: _Batch, pixels: torch.Tensor, ops: list[_LayerOps | None] | None = None,
             skip: _Skip | None = None, want: _Want | None = None) -> dict:
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
        with wrapped.trace(input_ids=batch.ids, attention_mask=batch.mask, position_ids=position_ids,
                           pixel_values=pixels):
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
            layers = wrapped.base.model.language_model.layers
            for layer in range(n_dec):
                j = inj_at.get(layer)
                if j is not None:
                    if skip is not None and j < skip.j:
                        wrapped.agf[j].skip(zero)  # its decoder layer is skipped: the update is never used
                    else:
                        apply_ablation(wrapped, j, ops[j] if ops is not None else None,
                                       store["gates"] if want.gates else None,
                                       reads_saved=store["reads"] if j in want.reads else None,
                                       reads_replacement=skip.reads if skip is not None and j == skip.j else None,
                                       kv_saved=store["kv"] if j in want.kv else None,
                                       kv_replacement=skip.kv.get(j) if skip is not None else None)
                if skip is not None and layer < skip.n_layers:
                    layers[layer].skip(skip.hidden)  # only the last skipped layer's value is ever read
                elif layer in want.hidden_after:
                    store["hidden"][layer] = layers[layer].output
            store["logits"] = wrapped.base.lm_head.output[batch.gather_rows, batch.gather_pos].float()
    return store


# =================================================================================== reference run

@dataclass
class _Reference:
    own: np.ndarray  # [N] own (unablated) argmax at the first answer position
    logprobs: list  # per sample [n_answer, V] log-probs (first row used for flips)
    gate_mass: np.ndarray | None  # [N, L, K] mean gates over the answer positions
    token_sums: dict[str, tuple[np.ndarray, np.ndarray]]  # tokens -> ([N, L, K] sums, [N] counts)
    gates: list | None  # per sample [L, T_s, K] (only when a patch needs them)
    filled: np.ndarray  # [N] bool: scores of this sample are in


def _new_reference(model, n: int, token_sets: set[str], keep_gates: bool) -> _Reference:
    n_layers = len(model.agf)
    k = _n_slots(model) if n_layers else 0
    sets = set(token_sets) | {"answer"}
    return _Reference(
        own=np.zeros(n, dtype=np.int64), logprobs=[None] * n,
        gate_mass=np.zeros((n, n_layers, k)) if n_layers else None,
        token_sums={t: (np.zeros((n, n_layers, k)), np.zeros(n)) for t in sets} if n_layers else {},
        gates=[None] * n if keep_gates else None, filled=np.zeros(n, dtype=bool))


@dataclass
class _Cache:
    """Reference values per sample (unpadded), for the `_Skip`s of the chunks of one block."""

    vision: dict = field(default_factory=dict)  # s -> [P+1, Dv]
    memory: dict = field(default_factory=dict)  # s -> [K, N, D]
    hidden: dict = field(default_factory=dict)  # (s, decoder layer) -> [T_s, D]
    reads: dict = field(default_factory=dict)  # (s, j) -> [T_s, K, D]
    kv: dict = field(default_factory=dict)  # (s, j) -> ([K, N, D] keys, [K, N, D] values)
    n_vision_states: int = 0


def _reference_pass(model, samples: list[_Sample], which: list[int], pixels: torch.Tensor, ref: _Reference,
                    suppress: list[int], pad_id: int, *, max_batch: int, want_cache: _Want | None,
                    progress: Callable[[int], None] | None) -> _Cache:
    """Unablated forwards of `which` (chunks of max_batch): fill `ref` for samples not filled yet and
    keep what `want_cache` asks for."""
    n_layers = len(model.agf)
    image_id = model.image_token_id
    cache = _Cache(n_vision_states=model.config.base_config.vision_config.num_hidden_layers + 1)
    want = want_cache or _Want()
    want = _Want(gates=n_layers > 0, vision=want.vision, memory=want.memory, hidden_after=want.hidden_after,
                 reads=want.reads, kv=want.kv)
    for start in range(0, len(which), max_batch):
        chunk = which[start:start + max_batch]
        batch = _batch(samples, chunk, pad_id, model.device)
        store = _forward(model, batch, pixels[chunk], want=want)
        lp = torch.log_softmax(store["logits"], dim=-1).cpu()
        masked = lp.clone()
        masked[:, suppress] = -math.inf
        g = torch.stack(list(store["gates"]), dim=1).cpu().numpy() if n_layers else None  # [R, L, W, K]
        fresh = 0
        for r, s in enumerate(chunk):
            off = int(batch.offsets[r])
            if want_cache is not None:
                if want.vision:
                    cache.vision[s] = store["vision"][r]
                if want.memory:
                    cache.memory[s] = store["memory"][r]
                for layer in want.hidden_after:
                    cache.hidden[(s, layer)] = store["hidden"][layer][r, off:]
                for j in want.reads:
                    cache.reads[(s, j)] = store["reads"][j][r, off:]
                for j in want.kv:
                    keys, values = store["kv"][j]
                    cache.kv[(s, j)] = (keys[r], values[r])
            if ref.filled[s]:
                continue
            fresh += 1
            a, b = batch.spans[r]
            ref.logprobs[s] = lp[a:b].numpy()
            ref.own[s] = int(masked[a].argmax())
            if g is not None:
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


def _pad_into(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Left-pad per-row `[T_r, ...]` tensors with zeros into `[R, width, ...]`."""
    first = parts[0]
    out = torch.zeros((len(parts), width, *first.shape[1:]), dtype=first.dtype, device=first.device)
    for r, part in enumerate(parts):
        out[r, width - part.shape[0]:] = part
    return out


def _make_skip(model, cache: _Cache, rows: list[tuple[int, int]], j: int, batch: _Batch, want: _Want) -> _Skip:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    width = batch.ids.shape[1]
    which = [s for s, _ in rows]
    n_layers = model.config.injection_layers[j]
    hidden = _pad_into([cache.hidden[(s, n_layers - 1)] for s in which], width) if n_layers > 0 else None
    reads = _pad_into([cache.reads[(s, j)] for s in which], width) if j in want.reads else None
    kv = {jj: (torch.stack([cache.kv[(s, jj)][0] for s in which]), torch.stack([cache.kv[(s, jj)][1] for s in which]))
          for jj in want.kv if jj > j}
    memory = None
    if want.memory:
        # AMP's output is read only by the AGF reads; those from j on are skipped whole (j) or have
        # their key/value maps replaced (kv): then a zero stand-in of the right shape is enough.
        readers = [jj for jj, agf in enumerate(model.agf) if jj >= j and hasattr(agf, "read")]
        if all(jj in kv or (jj == j and reads is not None) for jj in readers):
            first = cache.memory[which[0]]
            memory = torch.zeros((), dtype=first.dtype, device=first.device).expand(len(which), *first.shape)
        else:
            memory = torch.stack([cache.memory[s] for s in which])
    vision = None
    if want.vision:
        real = torch.stack([cache.vision[s] for s in which])  # [R, P+1, Dv]
        blank = torch.zeros((), dtype=real.dtype, device=real.device).expand(real.shape)  # AMP is skipped: shape only
        vfl = model.config.base_config.vision_feature_layer % cache.n_vision_states
        states = tuple(real if i == vfl else blank for i in range(cache.n_vision_states))
        vision = BaseModelOutputWithPooling(last_hidden_state=blank, pooler_output=None, hidden_states=states)
    return _Skip(j, n_layers if hidden is not None else 0, hidden, reads, vision, memory, kv)


def _reference_run(model, samples: list[_Sample], pixels: torch.Tensor, suppress: list[int], pad_id: int, *,
                   max_batch: int, token_sets: set[str], keep_gates: bool,
                   progress: Callable[[int], None] | None) -> _Reference:
    ref = _new_reference(model, len(samples), token_sets, keep_gates)
    _reference_pass(model, samples, list(range(len(samples))), pixels, ref, suppress, pad_id, max_batch=max_batch,
                    want_cache=None, progress=progress)
    return ref


def mean_gates(model, tokenizer, images: Sequence[Image.Image], questions: Sequence[str], *, tokens: str = "all",
               qtypes: Sequence[str | None] | None = None, max_batch: int = 256):
    """Token-pooled mean gate per LLM layer over the unablated runs: `[L, K]`, or with `qtypes`
    `{qtype: [L, K]}` — the `means` a ``mean`` ablation takes (e.g. from a held-out set)."""
    if tokens not in TOKEN_SETS:
        raise CLIVizError(f"unknown token set {tokens!r}; use one of {', '.join(TOKEN_SETS)}")
    samples = _layout(model, tokenizer, questions, None, qtypes)
    pixels = pixel_values(list(images), model.config).to(model.device, model.dtype)
    ref = _reference_run(model, samples, pixels, _suppressed(tokenizer), _pad_id(tokenizer), max_batch=max_batch, token_sets={tokens},
                         keep_gates=False, progress=None)
    if not ref.token_sums:
        raise CLIVizError(f"this model has no gates (fusion={model.config.fusion})")
    sums, counts = ref.token_sums[tokens]
    if qtypes is None:
        return (sums.sum(0) / max(counts.sum(), 1)).astype(np.float32)
    labels = np.asarray([str(q) for q in qtypes])
    return {q: (sums[labels == q].sum(0) / max(counts[labels == q].sum(), 1)).astype(np.float32)
            for q in sorted(set(labels))}


def _means_for(plan: _Plan, ref: _Reference, samples: list[_Sample]) -> Any:
    a = plan.ablation
    if a.means is not None:
        if isinstance(a.means, Mapping):
            return {str(q): np.asarray(m, dtype=np.float32) for q, m in a.means.items()}
        return np.asarray(a.means, dtype=np.float32)
    sums, counts = ref.token_sums[a.tokens]
    if not a.per_qtype:
        return (sums.sum(0) / max(counts.sum(), 1)).astype(np.float32)
    labels = np.asarray([str(s.qtype) for s in samples])
    return {q: (sums[labels == q].sum(0) / max(counts[labels == q].sum(), 1)).astype(np.float32)
            for q in sorted(set(labels))}


def _mean_vector(means: Any, qtype: str | None, j: int, n_layers: int, k: int) -> np.ndarray:
    m = means
    if isinstance(m, Mapping):
        if str(qtype) not in m:
            raise CLIVizError(f"no mean gates for question type {qtype!r} (have: {', '.join(map(str, m))})")
        m = m[str(qtype)]
    if m.shape != (n_layers, k):
        raise CLIVizError(f"mean gates have shape {m.shape}, expected ({n_layers}, {k}) for this model")
    return m[j]


def _donor_map(receiver: _Sample, donor: _Sample, n_img: int, image_id: int) -> np.ndarray:
    """Donor position for each receiver position (-1: no counterpart), aligned by role: the prompt
    head up to the last image token by position (a chat template's prefix is the same in every
    sample), the question words from their end, the answer from its start."""
    t_r, t_d = len(receiver.fed), len(donor.fed)
    p_r, p_d = len(receiver.prompt), len(donor.prompt)
    front = receiver.prompt.index(image_id) + n_img if image_id in receiver.prompt else 0
    front_d = donor.prompt.index(image_id) + n_img if image_id in donor.prompt else 0
    out = np.full(t_r, -1, dtype=np.int64)
    for p in range(t_r):
        if p < front:
            q = p if p < front_d else -1
        elif p < p_r:
            q = p_d - (p_r - p)
            q = q if q >= front else -1
        else:
            q = p_d + (p - p_r)
            q = q if q < t_d else -1
        out[p] = q
    return out


# ===================================================================================== scoring

def _chunk_ops(rows: list[tuple[int, int]], plans: list[_Plan], batch: _Batch, samples: list[_Sample],
               ref: _Reference, means: dict[int, Any], n_layers: int, k: int, image_id: int, device,
               plan_cfg) -> list[_LayerOps | None]:
    """Per-layer masks and fills for one chunk of (sample, condition) rows."""
    n_rows, width = batch.ids.shape
    ops: list[_LayerOps | None] = []
    for j in range(n_layers):
        gate_rows = [r for r, (_, c) in enumerate(rows) if plans[c].touches_gate and j in plans[c].layers]
        inj_rows = [r for r, (_, c) in enumerate(rows) if plans[c].inj_off and j in plans[c].layers]
        layer = _LayerOps()
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
                        where = _donor_map(sample, samples[d], n_image_tokens(plan_cfg), image_id)
                        has = where >= 0
                        fill[r, off:][has] = ref.gates[d][j][where[has]]
                        tok = tok & has
                mask[r, off:] = tok
            layer.gate = (torch.from_numpy(mask).to(device), torch.from_numpy(keep).to(device),
                          torch.from_numpy(renorm).to(device), torch.from_numpy(fill).to(device))
        if inj_rows:
            off_mask = np.zeros((n_rows, width), dtype=bool)
            for r in inj_rows:
                s, c = rows[r]
                off_mask[r, batch.offsets[r]:] = samples[s].token_mask(plans[c].ablation.tokens, image_id)
            layer.inj_off = torch.from_numpy(off_mask).to(device)
        ops.append(layer if (layer.gate is not None or layer.inj_off is not None) else None)
    return ops


def _score_row(lp: np.ndarray, sample: _Sample, own: int, suppress: list[int]) -> dict[str, Any]:
    """Numbers of one (sample, condition) from its log-probs at the answer positions `[n, V]`."""
    answer_ids = sample.answer if sample.answer else [own]
    masked = lp.copy()
    masked[:, suppress] = -np.inf
    top = masked.argmax(-1)
    picked = lp[np.arange(len(answer_ids)), answer_ids]
    return {
        "ref_token": int(answer_ids[0]),
        "logprob_ref": float(picked[0]),
        "logprob_ref_seq": float(picked.sum()),
        "logprob_own": float(lp[0, own]),
        "answer_token": int(top[0]),
        "answer_logprob": float(lp[0, top[0]]),
        "flipped": bool(top[0] != own),
        "correct": bool(np.all(top == np.asarray(answer_ids))),
    }


CACHE_BUDGET_BYTES = 1 << 30  # reference values kept for prefix sharing, per block of samples


def _cache_plan(model, samples: list[_Sample], plans: dict[int, _Plan], max_batch: int,
                share_prefix: bool) -> tuple[_Want | None, int]:
    """What to keep from the reference run for prefix sharing, and how many samples per block."""
    n = len(samples)
    if not share_prefix or not plans:
        return None, n
    cfg = model.config
    firsts = {min(p.layers) for p in plans.values()}
    per_group = max(sum(1 for p in plans.values() if min(p.layers) == g) for g in firsts)
    hidden_after = frozenset(cfg.injection_layers[g] - 1 for g in firsts if cfg.injection_layers[g] > 0)
    reads = frozenset(g for g in firsts if hasattr(model.agf[g], "read"))
    # every later AGF read recomputes attention from changed hidden states, but its key/value maps
    # of the visual memory are the same for all conditions of a sample: computed once, reused
    kv = frozenset(j for j, agf in enumerate(model.agf) if hasattr(agf, "read") and j > min(firsts))
    vision = cfg.base_model_type == "llava"  # OneVision batches crops, not samples: run its tower
    memory = model.amp is not None
    vc, tc = cfg.base_config.vision_config, cfg.base_config.text_config
    t = max(len(s.fed) for s in samples)
    n_img = n_image_tokens(cfg)
    k = _n_slots(model)
    elem = torch.finfo(model.dtype).bits // 8
    base = (vc.hidden_size * (n_img + 1) if vision else 0) + (k * n_img * tc.hidden_size if memory else 0)
    base += len(hidden_after) * t * tc.hidden_size
    with_reads = base + len(reads) * t * k * tc.hidden_size + len(kv) * 2 * k * n_img * tc.hidden_size
    if with_reads * elem > CACHE_BUDGET_BYTES:
        reads, kv = frozenset(), frozenset()
        with_reads = base
    if with_reads * elem > CACHE_BUDGET_BYTES:
        return None, n
    block = max(1, min(n, max_batch // per_group, CACHE_BUDGET_BYTES // (with_reads * elem)))
    return _Want(vision=vision, memory=memory, hidden_after=hidden_after, reads=reads, kv=kv), block


def _run_conditions(model, tokenizer, images, questions, references, conditions, *, qtypes=None, max_batch=256,
                    progress: Callable[[int], None] | None = None,
                    share_prefix: bool = True) -> tuple[pd.DataFrame, _Reference]:
    n = len(questions)
    if n == 0:
        raise CLIVizError("no samples to score")
    if len(images) != n or (references is not None and len(references) != n) or (qtypes is not None and len(qtypes) != n):
        raise CLIVizError("images, questions, references and qtypes must have the same length")
    if max_batch < 1:
        raise CLIVizError("max_batch must be at least 1")
    conditions = list(conditions)
    plans = {c: _plan(a, model) for c, a in enumerate(conditions) if a is not None}
    if any(p.ablation.kind == "mean" and p.ablation.per_qtype and p.ablation.means is None for p in plans.values()) and qtypes is None:
        raise CLIVizError("a per-question-type mean ablation needs the question types (qtypes)")
    samples = _layout(model, tokenizer, questions, references, qtypes)
    suppress = _suppressed(tokenizer)
    pad_id = _pad_id(tokenizer)
    pixels = pixel_values(list(images), model.config).to(model.device, model.dtype)
    token_sets = {p.ablation.tokens for p in plans.values() if p.ablation.kind == "mean" and p.ablation.means is None}
    keep_gates = any(p.ablation.kind == "patch" for p in plans.values())
    ref = _new_reference(model, n, token_sets, keep_gates)
    if token_sets or keep_gates:  # means / donors come from every sample: a full reference pass first
        _reference_pass(model, samples, list(range(n)), pixels, ref, suppress, pad_id, max_batch=max_batch,
                        want_cache=None, progress=progress)
    means = {c: _means_for(p, ref, samples) for c, p in plans.items() if p.ablation.kind == "mean"}
    n_layers = len(model.agf)
    k = _n_slots(model) if n_layers else 0
    image_id = model.image_token_id
    want, block = _cache_plan(model, samples, plans, max_batch, share_prefix)

    results: dict[tuple[int, int], dict[str, Any]] = {}
    for b0 in range(0, n, block):
        block_samples = list(range(b0, min(n, b0 + block)))
        cache = _reference_pass(model, samples, block_samples, pixels, ref, suppress, pad_id, max_batch=max_batch,
                                want_cache=want, progress=progress)
        if want is not None:  # one row group per first-touched layer, each with its own skips
            groups: dict[int, list[tuple[int, int]]] = {}
            for c, p in plans.items():
                groups.setdefault(min(p.layers), []).extend((s, c) for s in block_samples)
            todo = [(g, rows) for g, rows in sorted(groups.items())]
        else:
            todo = [(None, [(s, c) for s in block_samples for c in plans])]
        for g, group_rows in todo:
            group_rows.sort()
            for start in range(0, len(group_rows), max_batch):
                rows = group_rows[start:start + max_batch]
                which = [s for s, _ in rows]
                batch = _batch(samples, which, pad_id, model.device)
                ops = _chunk_ops(rows, plans, batch, samples, ref, means, n_layers, k, image_id, model.device,
                                 model.config)
                skip = _make_skip(model, cache, rows, g, batch, want) if g is not None else None
                store = _forward(model, batch, pixels[which], ops, skip=skip)
                lp = torch.log_softmax(store["logits"], dim=-1).cpu().numpy()
                for r, (s, c) in enumerate(rows):
                    a_, b_ = batch.spans[r]
                    results[(s, c)] = _score_row(lp[a_:b_], samples[s], int(ref.own[s]), suppress)
                if progress:
                    progress(len(rows))
        del cache

    base_rows = {s: _score_row(ref.logprobs[s], samples[s], int(ref.own[s]), suppress) for s in range(n)}
    records = []
    for s in range(n):
        for c, a in enumerate(conditions):
            res, base = (base_rows[s] if a is None else results[(s, c)]), base_rows[s]
            records.append({
                "sample": s,
                "condition": REFERENCE if a is None else a.label,
                "kind": "none" if a is None else a.kind,
                "qtype": qtypes[s] if qtypes is not None else None,
                "question": questions[s],
                "reference": " ".join(tokenizer.convert_ids_to_tokens(samples[s].answer or [int(ref.own[s])])),
                "own_answer": tokenizer.convert_ids_to_tokens(int(ref.own[s])),
                "answer": tokenizer.convert_ids_to_tokens(res["answer_token"]),
                "prob": math.exp(res["answer_logprob"]),
                "logprob_ref": res["logprob_ref"],
                "logprob_ref_seq": res["logprob_ref_seq"],
                "logprob_own": res["logprob_own"],
                "delta_logprob_ref": res["logprob_ref"] - base["logprob_ref"],
                "delta_logprob_own": res["logprob_own"] - base["logprob_own"],
                "flipped": res["flipped"],
                "correct": res["correct"],
            })
    return pd.DataFrame.from_records(records), ref


def check_conditions(model, conditions: Sequence[Ablation | None]) -> None:
    """Refuse (CLIVizError) ablations that do not fit this model (layers it lacks, no gates...)."""
    for a in conditions:
        if a is not None:
            _plan(a, model)


def score_with_gate_mass(model, tokenizer, images: Sequence[Image.Image], questions: Sequence[str],
                         references: Sequence[str | None] | None, conditions: Sequence[Ablation | None], *,
                         max_batch: int = 256, qtypes: Sequence[str | None] | None = None,
                         progress: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """`score_conditions` plus the unablated gate mass at the answer positions `[N, L, K]` (None
    without gates), for `effects_frame(..., gate_mass=...)` — no second reference forward."""
    frame, ref = _run_conditions(model, tokenizer, images, questions, references, conditions, qtypes=qtypes,
                                 max_batch=max_batch, progress=progress)
    return frame, ref.gate_mass


def score_conditions(model, tokenizer, images: Sequence[Image.Image], questions: Sequence[str],
                     references: Sequence[str | None] | None, conditions: Sequence[Ablation | None], *,
                     max_batch: int = 256, qtypes: Sequence[str | None] | None = None,
                     progress: Callable[[int], None] | None = None, share_prefix: bool = True) -> pd.DataFrame:
    """Teacher-forced scores of every (sample, condition): one row each (samples outer).

    A reference of None (or "") means the model's own unablated answer (first token). `None` in
    `conditions` is the unablated run. Columns: sample, condition, kind, qtype, question, reference,
    own_answer, answer (argmax under the condition), prob (its probability), logprob_ref (first
    reference token), logprob_ref_seq (whole reference), logprob_own (the unablated argmax token),
    delta_logprob_ref / delta_logprob_own (vs the unablated run), flipped, correct.
    """
    frame, _ = _run_conditions(model, tokenizer, images, questions, references, conditions, qtypes=qtypes,
                               max_batch=max_batch, progress=progress, share_prefix=share_prefix)
    return frame


# ================================================================================ effects / grids

def _layer_of(values: list[int] | None) -> Any:
    return values[0] if values is not None and len(values) == 1 else pd.NA


def effects_frame(scores: pd.DataFrame, conditions: Sequence[Ablation | None], *, gate_mass: np.ndarray | None = None,
                  injection_layers: Sequence[int] | None = None, vision_layers: Sequence[int] | None = None,
                  n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy effects per condition and question type (plus `all`): columns condition, llm_layer,
    vision_layer, qtype, metric, value, ci_low, ci_high, n. Metrics: delta_logprob_ref,
    delta_logprob_own, flip_rate, accuracy (under the condition), delta_accuracy, and — for
    single-cell conditions when `gate_mass [N, L, K]` is given — gate_mass (the cell's mean
    unablated gate at the answer positions). CIs: percentile bootstrap over samples (seeded)."""
    labels = [REFERENCE if a is None else a.label for a in conditions]
    if len(set(labels)) != len(labels):
        raise CLIVizError("two conditions have the same name; give them distinct `name`s")
    n = int(scores["sample"].max()) + 1
    by = scores.set_index(["sample", "condition"])
    base_correct = by.xs(REFERENCE, level="condition")["correct"].to_numpy(float) if REFERENCE in labels else None
    qtype_col = scores.groupby("sample")["qtype"].first().reindex(range(n))
    groups: list[tuple[str, np.ndarray]] = [(ALL, np.arange(n))]
    if qtype_col.notna().any():
        for q in sorted(qtype_col.dropna().astype(str).unique()):
            groups.append((q, np.flatnonzero(qtype_col.astype(str).to_numpy() == q)))

    per_metric: dict[str, np.ndarray] = {}  # metric -> [N, C] per-sample values (nan = not defined)
    n_c = len(labels)
    for m in ("delta_logprob_ref", "delta_logprob_own"):
        per_metric[m] = np.stack([by.xs(lab, level="condition")[m].to_numpy(float) for lab in labels], axis=1)
    per_metric["flip_rate"] = np.stack([by.xs(lab, level="condition")["flipped"].to_numpy(float) for lab in labels], 1)
    acc = np.stack([by.xs(lab, level="condition")["correct"].to_numpy(float) for lab in labels], 1)
    per_metric["accuracy"] = acc
    if base_correct is None:
        raise CLIVizError("the effects need the unablated reference among the conditions (None)")
    per_metric["delta_accuracy"] = acc - base_correct[:, None]
    if gate_mass is not None and injection_layers is not None and vision_layers is not None:
        gm = np.full((n, n_c), np.nan)
        for c, a in enumerate(conditions):
            if a is None or a.llm_layers is None or a.vision_layers is None:
                continue
            if len(a.llm_layers) == 1 and len(a.vision_layers) == 1:
                j = list(injection_layers).index(a.llm_layers[0])
                k = list(vision_layers).index(a.vision_layers[0])
                gm[:, c] = gate_mass[:, j, k]
        per_metric["gate_mass"] = gm

    records = []
    for g_index, (group, idx) in enumerate(groups):
        boot = np.random.default_rng([seed, g_index]).integers(0, len(idx), size=(n_boot, len(idx))) if n_boot else None
        for metric, values in per_metric.items():
            x = values[idx]  # [n_g, C]
            mean = x.mean(axis=0)
            if boot is not None and len(idx) > 1:
                bm = x[boot].mean(axis=1)  # [B, C]
                lo, hi = np.percentile(bm, [2.5, 97.5], axis=0)
            else:
                lo = hi = mean
            for c, a in enumerate(conditions):
                if np.isnan(mean[c]) and metric == "gate_mass":
                    continue
                records.append({
                    "condition": labels[c],
                    "llm_layer": _layer_of(a.llm_layers) if a is not None else pd.NA,
                    "vision_layer": _layer_of(a.vision_layers) if a is not None else pd.NA,
                    "qtype": group, "metric": metric, "value": float(mean[c]),
                    "ci_low": float(lo[c]), "ci_high": float(hi[c]), "n": int(len(idx)),
                })
    frame = pd.DataFrame.from_records(records)
    frame["llm_layer"] = frame["llm_layer"].astype("Int64")
    frame["vision_layer"] = frame["vision_layer"].astype("Int64")
    return frame


def grid_conditions(model, kind: str = "knockout", tokens: str = "all") -> list[Ablation | None]:
    """The reference plus one single-cell ablation per (injection layer, vision layer)."""
    cfg = model.config
    if len(model.agf) == 0:
        raise CLIVizError(f"this model has no gates (fusion={cfg.fusion}): no knockout grid")
    return [None] + [Ablation(kind, [i], [k], tokens=tokens, name=f"{kind} L{i} V{k}")
                     for i in cfg.injection_layers for k in cfg.vision_layers]


def knockout_grid(model, tokenizer, images: Sequence[Image.Image], questions: Sequence[str],
                  references: Sequence[str | None] | None, *, qtypes: Sequence[str | None] | None = None,
                  max_batch: int = 256, tokens: str = "all", n_boot: int = 1000, seed: int = 0,
                  progress: Callable[[int], None] | None = None, share_prefix: bool = True) -> pd.DataFrame:
    """Every injection layer x every vision layer knockout plus the reference, batched.

    Tidy rows (condition, llm_layer, vision_layer, qtype, metric, value, ci_low, ci_high, n); the
    effects are changes versus the reference (see `effects_frame`). Example::

        grid = knockout_grid(model, tok, images, questions, answers, qtypes=qtypes)
        grid_matrix(grid, model.config, "delta_logprob_ref")      # [L, K] for a heatmap
    """
    conditions = grid_conditions(model, "knockout", tokens)
    scores, ref = _run_conditions(model, tokenizer, images, questions, references, conditions, qtypes=qtypes,
                                  max_batch=max_batch, progress=progress, share_prefix=share_prefix)
    return effects_frame(scores, conditions, gate_mass=ref.gate_mass, injection_layers=model.config.injection_layers,
                         vision_layers=model.config.vision_layers, n_boot=n_boot, seed=seed)


@torch.no_grad()
def naive_knockout_grid(model, tokenizer, images: Sequence[Image.Image], questions: Sequence[str],
                        references: Sequence[str | None] | None, *, qtypes: Sequence[str | None] | None = None,
                        tokens: str = "all", n_boot: int = 1000, seed: int = 0, **_: Any) -> pd.DataFrame:
    """`knockout_grid` the slow, obvious way: a Python loop of one unpadded forward per (cell,
    sample), the knockout written out by hand inside each trace. For benchmarks and identity tests."""
    conditions = grid_conditions(model, "knockout", tokens)
    samples = _layout(model, tokenizer, questions, references, qtypes)
    suppress = _suppressed(tokenizer)
    wrapped = envoy(model)
    cfg = model.config
    image_id = model.image_token_id
    records, mass = [], None
    for s, sample in enumerate(samples):
        ids = torch.tensor([sample.fed], device=model.device)
        pix = pixel_values([images[s]], cfg).to(model.device, model.dtype)
        pos = list(range(len(sample.prompt) - 1, len(sample.prompt) - 1 + sample.n_answer))
        tok_mask = torch.from_numpy(sample.token_mask(tokens, image_id)).to(model.device)
        own = None
        base = None
        for c, a in enumerate(conditions):
            with wrapped.trace(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix):
                if a is None:
                    gates = nnsight.save([wrapped.agf[j].gate.output.float() for j in range(len(model.agf))])
                else:
                    j = cfg.injection_layers.index(a.llm_layers[0])
                    k = cfg.vision_layers.index(a.vision_layers[0])
                    g = wrapped.agf[j].gate.output
                    g2 = g.clone().float()
                    g2[..., k] = 0
                    g2 = g2 / g2.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                    wrapped.agf[j].gate.output = torch.where(tok_mask[None, :, None], g2, g.float()).to(g.dtype)
                logits = nnsight.save(wrapped.base.lm_head.output[0, pos].float())
            lp = torch.log_softmax(logits, dim=-1).cpu().numpy()
            if a is None:
                masked = lp[0].copy()
                masked[suppress] = -np.inf
                own = int(masked.argmax())
                g = torch.stack(list(gates), dim=0)[:, 0].cpu().numpy()  # [L, T, K]
                if mass is None:
                    mass = np.zeros((len(samples), g.shape[0], g.shape[-1]))
                m = sample.token_mask("answer", image_id)
                mass[s] = g[:, m].mean(axis=1)
            res = _score_row(lp, sample, own, suppress)
            if a is None:
                base = res
            records.append({
                "sample": s, "condition": REFERENCE if a is None else a.label,
                "qtype": qtypes[s] if qtypes is not None else None,
                "delta_logprob_ref": res["logprob_ref"] - base["logprob_ref"],
                "delta_logprob_own": res["logprob_own"] - base["logprob_own"],
                "flipped": res["flipped"], "correct": res["correct"],
            })
    scores = pd.DataFrame.from_records(records)
    return effects_frame(scores, conditions, gate_mass=mass, injection_layers=cfg.injection_layers,
                         vision_layers=cfg.vision_layers, n_boot=n_boot, seed=seed)


def grid_matrix(grid: pd.DataFrame, vision_layers: Sequence[int] | Any, injection_layers: Sequence[int] | None = None,
                metric: str = "delta_logprob_ref", qtype: str = ALL) -> np.ndarray:
    """`[L, K]` matrix of one metric from a grid frame (rows: injection layers, cols: vision layers).
    Pass a model config instead of the two layer lists: `grid_matrix(grid, model.config, metric=...)`."""
    if injection_layers is None and hasattr(vision_layers, "injection_layers"):
        cfg = vision_layers
        vision_layers, injection_layers = cfg.vision_layers, cfg.injection_layers
    cells = grid[(grid["metric"] == metric) & (grid["qtype"] == qtype) & grid["llm_layer"].notna()
                 & grid["vision_layer"].notna()]
    if cells.empty:
        raise CLIVizError(f"no grid cells for metric {metric!r} and question type {qtype!r}")
    table = cells.pivot_table(index="llm_layer", columns="vision_layer", values="value", aggfunc="first")
    table = table.reindex(index=list(injection_layers), columns=list(vision_layers))
    return table.to_numpy(dtype=float)


# ============================================================================ one cell (dashboard)

def single_cell(model, tokenizer, image: Image.Image, question: str, llm_layer: int, vision_layer: int | None,
                kind: str = "knockout") -> dict[str, Any]:
    """Ablate one (LLM layer, vision layer) cell for one question; compare with the unablated answer.

    Returns `answer`, `prob` (argmax under the ablation and its probability), `base_answer`,
    `base_prob` (unablated), `delta_logprob` (change of the base answer's log-prob), plus
    `base_answer_prob` (the base answer's probability under the ablation) and `flipped`.
    `vision_layer` is ignored by ``uniform`` and ``injection_off``; ``mean`` and ``patch`` need a
    data set and are refused here.
    """
    if kind in ("mean", "patch"):
        raise CLIVizError(f"a {kind} ablation needs a data set; use score_conditions")
    if kind not in KINDS:
        raise CLIVizError(f"unknown ablation kind {kind!r}; use one of {', '.join(KINDS)}")
    vis = None if kind in ("uniform", "injection_off") or vision_layer is None else [vision_layer]
    ablation = Ablation(kind, [llm_layer], vis, value=vision_layer if kind == "onehot" else None)
    frame = score_conditions(model, tokenizer, [image], [question], None, [None, ablation], max_batch=2)
    base, abl = frame.iloc[0], frame.iloc[1]

    def text(word: str) -> str:  # as `cliviz.inference.decode_answer`: an answer that ends at once is ""
        return "" if word == tokenizer.eos_token else word

    return {
        "answer": text(abl["answer"]), "prob": float(abl["prob"]),
        "base_answer": text(base["answer"]), "base_prob": float(base["prob"]),
        "delta_logprob": float(abl["delta_logprob_own"]),
        "base_answer_prob": float(math.exp(abl["logprob_own"])),
        "flipped": bool(abl["flipped"]),
        "condition": abl["condition"],
    }


# ================================================================================== faithfulness

# effect metric -> sign that turns it into "how much removing the cell hurt" (larger = more harm)
_HARM = {"delta_logprob_ref": ("drop_logprob_ref", -1.0), "delta_logprob_own": ("drop_logprob_own", -1.0),
         "flip_rate": ("flip_rate", 1.0), "delta_accuracy": ("drop_accuracy", -1.0)}


def _mass_table(gate_mass_frame: pd.DataFrame | None, grid_frame: pd.DataFrame) -> pd.DataFrame:
    src = grid_frame if gate_mass_frame is None else gate_mass_frame
    if "metric" in src.columns:
        src = src[src["metric"] == "gate_mass"].rename(columns={"value": "gate_mass"})
    else:
        col = next((c for c in ("gate_mass", "gate", "value") if c in src.columns), None)
        if col is None:
            raise CLIVizError("the gate-mass frame needs a gate_mass, gate or value column")
        src = src.rename(columns={col: "gate_mass"})
    if src.empty:
        raise CLIVizError("no gate mass to correlate with (a grid from knockout_grid carries it as metric gate_mass)")
    cols = ["llm_layer", "vision_layer", "gate_mass"] + (["qtype"] if "qtype" in src.columns else [])
    out = src[cols].copy()
    out["llm_layer"] = out["llm_layer"].astype("int64")
    out["vision_layer"] = out["vision_layer"].astype("int64")
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan")
    try:
        from scipy.stats import spearmanr

        res = spearmanr(x, y)
        return float(res.statistic), float(res.pvalue)
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return float(pd.Series(x).rank().corr(pd.Series(y).rank())), float("nan")


def faithfulness(grid_frame: pd.DataFrame, gate_mass_frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Does a cell's gate mass predict what knocking it out costs? Spearman rank correlation over the
    (LLM layer, vision layer) cells, per question type and overall (`all`).

    `grid_frame`: a `knockout_grid` frame. `gate_mass_frame`: the cells' mean unablated gate at the
    answer positions — a tidy frame with `metric == "gate_mass"` (a grid carries it: the default),
    or columns llm_layer, vision_layer, gate|gate_mass [, qtype] (e.g.
    `heatmaps.gate_matrix_frame(mean_gate_matrix(traces), ...)`). Effects are oriented as harm
    (drop_logprob_ref = -delta_logprob_ref, flip_rate, drop_accuracy, ...): rho > 0 means the cells
    the gates weigh most are the ones the answer depends on most. Columns: qtype, effect, rho,
    p_value, n_cells.
    """
    cells = grid_frame[grid_frame["llm_layer"].notna() & grid_frame["vision_layer"].notna()
                       & grid_frame["metric"].isin(list(_HARM))].copy()
    if cells.empty:
        raise CLIVizError("the grid frame has no knockout cells")
    cells["llm_layer"] = cells["llm_layer"].astype("int64")
    cells["vision_layer"] = cells["vision_layer"].astype("int64")
    mass = _mass_table(gate_mass_frame, grid_frame)
    rows = []
    qtypes = [ALL] + sorted(q for q in cells["qtype"].astype(str).unique() if q != ALL)
    for q in qtypes:
        eff = cells[cells["qtype"].astype(str) == q]
        if "qtype" in mass.columns and (mass["qtype"].astype(str) == q).any():
            m = mass[mass["qtype"].astype(str) == q].drop(columns="qtype")
        elif "qtype" in mass.columns and q == ALL and mass["qtype"].isna().all():
            m = mass.drop(columns="qtype")
        elif "qtype" in mass.columns and (mass["qtype"].astype(str) == ALL).any():
            m = mass[mass["qtype"].astype(str) == ALL].drop(columns="qtype")
        elif "qtype" not in mass.columns:
            m = mass
        else:
            continue
        for metric, (effect, sign) in _HARM.items():
            e = eff[eff["metric"] == metric][["llm_layer", "vision_layer", "value"]]
            joined = e.merge(m, on=["llm_layer", "vision_layer"]).dropna()
            if joined.empty:
                continue
            rho, p = _spearman(joined["gate_mass"].to_numpy(float), sign * joined["value"].to_numpy(float))
            rows.append({"qtype": q, "effect": effect, "rho": rho, "p_value": p, "n_cells": len(joined)})
    return pd.DataFrame(rows, columns=["qtype", "effect", "rho", "p_value", "n_cells"])
