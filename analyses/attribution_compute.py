"""Computing attributions: hooks that make the gates an input, integrated gradients, gradient × input.

The definitions (targets, methods, baselines, completeness) are in the `attributions` module
docstring; this module only computes them and returns an `AttributionResult`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from cliviz.analyses.attribution_result import AttributionResult, _prompt_positions
from cliviz.analyses.attribution_settings import BASELINES, DEFAULT_TARGET, REL_FLOOR, check_options
from cliviz.errors import CLIVizError
from cliviz.tracing.schema import Trace

# ===================================================================================== hooks
# Hooks live only for one `attribute` call and act only when the ContextVar holds *their* state,
# so other threads using the same model (the dashboard) run it untouched meanwhile.


@dataclass(eq=False)
class _HookState:
    mode: str = "off"  # off | record | run
    gates: torch.Tensor | None = None  # run: [B, L, T, K] replaces every gate output
    embeds: torch.Tensor | None = None  # run: [B, T, D] replaces the language model's inputs_embeds
    rec_gates: list = field(default_factory=list)
    rec_norms: list = field(default_factory=list)
    rec_embeds: torch.Tensor | None = None


_ACTIVE: contextvars.ContextVar[_HookState | None] = contextvars.ContextVar("cliviz_attribution", default=None)


@contextlib.contextmanager
def _hooks(model):
    state = _HookState()

    def gate_hook(j: int):
        def hook(module, args, out):
            if _ACTIVE.get() is not state:
                return None
            if state.mode == "record":
                state.rec_gates.append(out.detach().float())
            elif state.gates is not None:
                return state.gates[:, j].to(out.dtype)  # [B, T, K]
            return None

        return hook

    def injection_hook(module, args, out):
        if _ACTIVE.get() is state and state.mode == "record":
            state.rec_norms.append(out.detach().float().norm(dim=-1))  # [B, T]

    def embeds_hook(module, args, kwargs):
        if _ACTIVE.get() is not state:
            return None
        if state.mode == "record":
            state.rec_embeds = kwargs["inputs_embeds"].detach()
        elif state.embeds is not None:
            return args, {**kwargs, "inputs_embeds": state.embeds}
        return None

    handles = []
    try:
        for j, layer in enumerate(model.agf):
            handles.append(layer.gate.register_forward_hook(gate_hook(j)))
            handles.append(layer.injection.register_forward_hook(injection_hook))
        handles.append(model.base.model.language_model.register_forward_pre_hook(embeds_hook, with_kwargs=True))
        token = _ACTIVE.set(state)
        try:
            yield state
        finally:
            _ACTIVE.reset(token)
    finally:
        for h in handles:
            h.remove()


class _Runner:
    """The model as functions of (embeddings, AMP memory, gates) for one teacher-forced sequence.

    `record(ids)` runs the real model once and keeps the merged input embeddings (image features
    already at the image tokens), the AMP memory, the gates and the injection norms; later calls
    reuse them, so the vision tower runs once per attribution (except `deepstack`, which needs the
    pixel path for its image-token injection and gets the embeddings swapped in by a hook).
    """

    def __init__(
        self,
        model,
        state: _HookState,
        images: dict[str, torch.Tensor],
        answer_positions,
        answer_ids,
        target: str = DEFAULT_TARGET,
    ):
        self.model, self.state, self.images, self.target = model, state, images, target  # pixel_values (+ image_sizes)
        dev = model.device
        self.positions = torch.as_tensor(np.asarray(answer_positions), dtype=torch.long, device=dev)  # [n]
        self.targets = torch.as_tensor(np.asarray(answer_ids), dtype=torch.long, device=dev)  # [n]
        self.runner_up: torch.Tensor | None = None  # [n] for target="margin", set from the real logits
        self.ids = self.embeds = self.memory = self.memory_mask = None

    def record(self, ids: torch.Tensor):
        """One real forward over `ids [1, T]`: returns (gates [L,T,K], norms [L,T], logits at answer positions)."""
        st = self.state
        st.mode, st.rec_gates, st.rec_norms = "record", [], []
        with torch.no_grad():
            out = self.model(input_ids=ids, **self.images, attention_mask=torch.ones_like(ids), use_cache=False)
        st.mode = "run"
        self.ids, self.embeds, self.memory = ids, st.rec_embeds, out.vision_memory  # [1,T,D], [1,K,N,D]
        self.memory_mask = out.vision_memory_mask  # [1, N] or None
        gates = torch.stack([g[0] for g in st.rec_gates]) if st.rec_gates else None  # [L, T, K]
        norms = torch.stack([n[0] for n in st.rec_norms]) if st.rec_norms else None  # [L, T]
        return gates, norms, out.logits[0, self.positions].float()  # [n, V]

    def values(self, embeds: torch.Tensor, memory: torch.Tensor | None, gates: torch.Tensor | None) -> torch.Tensor:
        """The target `f` of every answer token, `[B, n_answer]`; `gates [B, L, T, K]` replaces the gate
        outputs (None: live)."""
        b = embeds.shape[0]
        self.state.gates = gates
        mask = torch.ones(b, embeds.shape[1], dtype=torch.long, device=embeds.device)
        try:
            if self.model.config.fusion == "deepstack":
                self.state.embeds = embeds
                images = {k: v.expand(b, *v.shape[1:]) for k, v in self.images.items()}
                out = self.model(
                    input_ids=self.ids.expand(b, -1),
                    **images,
                    attention_mask=mask,
                    use_cache=False,
                    logits_to_keep=self.positions,
                )
            else:
                memory_mask = None if self.memory_mask is None else self.memory_mask.expand(b, -1)
                sizes = self.images.get("image_sizes")  # OneVision: where each memory token sits (position code)
                out = self.model(
                    inputs_embeds=embeds,
                    vision_memory=memory,
                    vision_memory_mask=memory_mask,
                    image_sizes=None if sizes is None else sizes.expand(b, *sizes.shape[1:]),
                    attention_mask=mask,
                    use_cache=False,
                    logits_to_keep=self.positions,
                )
        finally:
            self.state.gates = self.state.embeds = None
        return target_values(out.logits.float(), self.targets, self.target, self.runner_up)  # [B, n]

    def const(self, b: int):
        """Embeddings and memory repeated `b` times (no grad)."""
        m = self.memory.expand(b, *self.memory.shape[1:]) if self.memory is not None else None
        return self.embeds.expand(b, *self.embeds.shape[1:]), m

    def gate_fn(self, s: int):
        """`G [B, L, T, K] -> f_s [B]` for Captum."""

        def f(gates: torch.Tensor) -> torch.Tensor:
            e, m = self.const(gates.shape[0])
            return self.values(e, m, gates)[:, s]

        return f


def target_values(
    logits: torch.Tensor, answer_ids: torch.Tensor, target: str, runner_up: torch.Tensor | None = None
) -> torch.Tensor:
    """`f` for every answer token from `logits [B, n, V]` and `answer_ids [n]`: `[B, n]`."""
    b = logits.shape[0]
    index = answer_ids.view(1, -1, 1).expand(b, -1, 1)
    if target == "logprob":
        return torch.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
    chosen = logits.gather(-1, index).squeeze(-1)  # [B, n]
    if target == "logit":
        return chosen
    if runner_up is None:
        raise ValueError("the margin target needs the runner-up tokens")
    return chosen - logits.gather(-1, runner_up.view(1, -1, 1).expand(b, -1, 1)).squeeze(-1)


def runner_up_ids(logits: torch.Tensor, answer_ids: torch.Tensor, never: list[int]) -> torch.Tensor:
    """The best other token at each answer position, `[n]`, from the real logits `[n, V]`; tokens
    generation never emits (`never`: padding, `<bos>`, image placeholders) are not candidates."""
    masked = logits.clone()
    masked[:, never] = -torch.inf
    masked[torch.arange(len(answer_ids)), answer_ids] = -torch.inf
    return masked.argmax(-1)


def _patch_grid(model, n: int) -> tuple[int, int]:
    """The patch grid of the memory: square for LLaVA; a LLaVA-OneVision memory (base crop, anyres
    grid and newlines packed in one row) is shown as that one row."""
    vc = model.config.base_config.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    return (side, side) if side * side == n else (1, n)


def _forced_trace(trace: Trace, tokenizer, answer_ids: list[int], gates, norms, logits, top_k: int = 5) -> Trace:
    """`trace` with its answer replaced by the teacher-forced `answer_ids` (gates from that forward)."""
    from cliviz.inference import token_texts

    n_prompt = int(trace.answer_positions[0]) + 1
    fed = trace.token_ids[:n_prompt].tolist() + answer_ids[:-1]
    lp = torch.log_softmax(logits, dim=-1).cpu()  # [n, V]
    ids = torch.tensor(answer_ids)
    top = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
    words = [t for t in tokenizer.convert_ids_to_tokens(answer_ids) if t != tokenizer.eos_token]
    L, K = len(trace.meta.injection_layers), len(trace.meta.vision_layers)
    return dataclasses.replace(
        trace,
        meta=dataclasses.replace(trace.meta, answer=" ".join(words)),
        token_ids=np.asarray(fed, dtype=np.int64),
        token_texts=token_texts(tokenizer, fed),
        token_roles=trace.token_roles[:n_prompt] + ["answer"] * (len(answer_ids) - 1),
        gates=gates.cpu().numpy().astype(np.float32) if gates is not None else np.zeros((L, len(fed), K), np.float32),
        injection_norm=norms.cpu().numpy().astype(np.float32)
        if norms is not None
        else np.zeros((L, len(fed)), np.float32),
        answer_ids=np.asarray(answer_ids, dtype=np.int64),
        answer_texts=token_texts(tokenizer, answer_ids),
        answer_positions=np.arange(n_prompt - 1, n_prompt - 1 + len(answer_ids), dtype=np.int64),
        answer_logprobs=lp.gather(-1, ids[:, None]).squeeze(-1).numpy().astype(np.float32),
        topk_ids=top.indices.numpy().astype(np.int64),
        topk_texts=[token_texts(tokenizer, r) for r in top.indices.tolist()],
        topk_logprobs=top.values.numpy().astype(np.float32),
        attributions={},
    )


def _answer_ids(tokenizer, answer: str) -> list[int]:
    words = answer.split()
    if not words:
        raise CLIVizError("the answer to attribute is empty")
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # `tokenize` maps unknown words to [UNK]
    if backend is not None and backend.pre_tokenizer is not None:
        text = backend.normalizer.normalize_str(answer) if backend.normalizer is not None else answer
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    else:
        words = tokenizer.tokenize(answer)
    unknown = [w for w in dict.fromkeys(words) if w not in vocab]
    if unknown:
        raise CLIVizError(f"answer words not in the model's vocabulary: {', '.join(map(repr, unknown[:5]))}")
    return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def baseline_gates(gates: torch.Tensor, baseline: str) -> torch.Tensor:
    """Baseline G' for `gates [..., K]`: `uniform` (1/K) or `injection_off` (0)."""
    if baseline == "uniform":
        return torch.full_like(gates, 1.0 / gates.shape[-1])
    if baseline == "injection_off":
        return torch.zeros_like(gates)
    raise CLIVizError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")


def integrated_gradients(
    fn, gates: torch.Tensor, base: torch.Tensor, steps: int, internal_batch_size: int
) -> torch.Tensor:
    """Captum IG of `fn: [B, L, T, K] -> [B]` from `base` to `gates` (`[L, T, K]` each): `[L, T, K]`."""
    from captum.attr import IntegratedGradients

    attr = IntegratedGradients(fn).attribute(
        gates[None],
        baselines=base[None],
        n_steps=int(steps),
        method="gausslegendre",
        internal_batch_size=int(internal_batch_size),
    )
    return attr[0]


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    if was:
        model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def attribute(
    model,
    tokenizer,
    image: Image.Image,
    question: str,
    *,
    method: str = "ig",
    steps: int = 64,
    baseline: str = "uniform",
    internal_batch_size: int = 16,
    answer: str | None = None,
    max_new_tokens: int = 4,
    target: str = DEFAULT_TARGET,
) -> AttributionResult:
    """Attribute every answer token to gate cells, image patches and prompt tokens.

    `method`: `ig` (integrated gradients on the gates, `steps` Gauss-Legendre points from
    `baseline`, at most `internal_batch_size` points per forward) or `gxi` (gradient × input).
    `target`: `margin` (default: logit minus the runner-up's), `logit` or `logprob` (flat when p is
    close to 1: see `warnings()`). `answer`: attribute this answer (words in the vocabulary; `<eos>`
    is appended) instead of the model's greedy one. Raises `CLIVizError` for bad options, words or a
    gate-less model. Example::

        from cliviz import attribute, load_image, load_model
        model, tok = load_model()
        image = load_image("assets/examples/color.png")
        r = attribute(model, tok, image, "what color is the triangle ?", method="gxi", target="logit")
        r.top_cells(0)              # [(llm_layer, vision_layer, value), ...]
    """
    from cliviz.inference import prepare_inputs, suppressed_tokens
    from cliviz.tracing.record import trace as record_trace

    check_options(method, baseline, steps, internal_batch_size, target)
    if model.config.fusion == "projector" or len(model.agf) == 0:
        raise CLIVizError(
            f"this model has no gates (fusion={model.config.fusion}): nothing is injected, "
            "so there are no gate cells or patch maps to attribute"
        )
    forced = _answer_ids(tokenizer, answer) if answer is not None else None
    tr = record_trace(model, tokenizer, image, question, max_new_tokens=max_new_tokens, causal_check=False)
    n_prompt = int(tr.answer_positions[0]) + 1
    answer_ids = forced if forced is not None else tr.answer_ids.tolist()
    fed = tr.token_ids[:n_prompt].tolist() + list(answer_ids[:-1])
    positions = np.arange(n_prompt - 1, n_prompt - 1 + len(answer_ids))
    images = {
        k: v
        for k, v in prepare_inputs(model, tokenizer, [image], [question]).items()
        if k in ("pixel_values", "image_sizes")
    }
    ids = torch.tensor([fed], dtype=torch.long, device=model.device)

    with _eval_mode(model), _hooks(model) as state, torch.enable_grad():
        run = _Runner(model, state, images, positions, answer_ids, target)
        gates, norms, logits = run.record(ids)
        if target == "margin":
            run.runner_up = runner_up_ids(logits, run.targets, suppressed_tokens(tokenizer))  # [n]
        if forced is not None:
            tr = _forced_trace(tr, tokenizer, list(answer_ids), gates, norms, logits)
        embed_scores, patches = _live_gradients(run, tr, model, len(answer_ids))
        per_pos, completeness, f_x, f_b = _gate_attributions(
            run, gates, len(answer_ids), method, baseline, steps, internal_batch_size
        )
    prompt_pos = _prompt_positions(tr)
    image_pos = np.flatnonzero(tr.role_mask("image"))
    return AttributionResult(
        trace=tr,
        method=method,
        baseline=baseline,
        steps=int(steps),
        gate_cells=per_pos.sum(axis=2).astype(np.float32),
        patches=patches.astype(np.float32),
        patch_grid=_patch_grid(model, patches.shape[2]),
        prompt_scores=embed_scores[:, prompt_pos].astype(np.float32),
        prompt_tokens=[tr.token_texts[p] for p in prompt_pos],
        prompt_positions=prompt_pos,
        completeness_error=completeness,
        image_token_scores=embed_scores[:, image_pos].astype(np.float32),
        gate_token_scores=per_pos.sum(axis=(1, 3)).astype(np.float32),
        target_value=f_x.astype(np.float32),
        baseline_value=f_b.astype(np.float32),
        target=target,
        runner_up_ids=run.runner_up.cpu().numpy() if run.runner_up is not None else None,
    )


def _live_gradients(run: _Runner, tr: Trace, model, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradient x input on the embeddings and the AMP memory of the live model, every answer token at
    once (row s of a batch of n carries target s, so sum_s f_s[row s] separates the gradients):
    `(embedding scores [n, T], patch scores [n, K, N])` — patches NaN without an AMP memory."""
    eye = torch.eye(n, device=model.device)
    e, m = run.const(n)
    e = e.detach().clone().requires_grad_(True)
    leaves = [e]
    if m is not None:
        m = m.detach().clone().requires_grad_(True)
        leaves.append(m)
    values = run.values(e, m, None)  # [n, n]
    grads = torch.autograd.grad((values * eye).sum(), leaves)
    embed_scores = (grads[0] * e).sum(-1).float().detach().cpu().numpy()  # [n, T]
    if m is not None:
        return embed_scores, (grads[1] * m).sum(-1).float().detach().cpu().numpy()  # [n, K, N]
    n_img = int(tr.role_mask("image").sum())
    return embed_scores, np.full((n, len(model.config.vision_layers), n_img), np.nan, dtype=np.float32)


def _gate_attributions(
    run: _Runner, gates: torch.Tensor, n: int, method: str, baseline: str, steps: int, internal_batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The gates as the input, real `gates [L, T, K]` against the baseline gates: per-position
    attributions `[n, L, T, K]`, the completeness error `[n]` (NaN for gxi), f(x) and f(baseline) `[n]`."""
    g_base = baseline_gates(gates, baseline)
    e1, m1 = run.const(2)
    with torch.no_grad():
        f_pair = run.values(e1, m1, torch.stack([gates, g_base]))  # [2, n]
    f_x, f_b = f_pair[0].cpu().numpy(), f_pair[1].cpu().numpy()
    if method == "gxi":
        g = gates.expand(n, *gates.shape).clone().requires_grad_(True)  # [n, L, T, K]
        en, mn = run.const(n)
        values = run.values(en, mn, g)
        (grad,) = torch.autograd.grad((values * torch.eye(n, device=g.device)).sum(), [g])
        per_pos = (grad * g).detach()  # [n, L, T, K]
        completeness = np.full(n, np.nan, dtype=np.float32)
    else:
        per_pos = torch.stack(
            [integrated_gradients(run.gate_fn(s), gates, g_base, steps, internal_batch_size) for s in range(n)]
        ).detach()  # [n, L, T, K]
        total = per_pos.sum(dim=(1, 2, 3)).cpu().numpy()
        delta = f_x - f_b
        completeness = (np.abs(total - delta) / np.maximum(np.abs(delta), REL_FLOOR)).astype(np.float32)
    return per_pos.float().cpu().numpy(), completeness, f_x, f_b
