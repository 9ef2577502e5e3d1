"""Traces with the exact shapes a real checkpoint records, made without running one.

For exercising every output at real scale (stores, figures, pages, the dashboard) on a machine
with no 7B model: random gates whose rows sum to 1, built and validated through the public
`Trace` / `TraceMeta` API, so a synthetic trace is indistinguishable in form from a recorded one.

Shapes (`REAL_SHAPES`): LLaVA-1.5-7B (CLIP-L/14-336: 24 x 24 = 576 image tokens, 25 hidden states;
Llama-2-7B: 32 layers, 31 injection layers after layer 0) and LLaVA-OneVision-7B (SigLIP: 27 hidden
states; Qwen2-7B: 28 layers, 27 injection layers; anyres: ~2,900 image tokens).

Example::

    from cliviz.tracing.synthetic import real_shape_trace
    t = real_shape_trace("llava-1.5-7b", seed=0)
    t.gates.shape            # (31, 616, 25)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cliviz import __version__
from cliviz.errors import CLIVizError
from cliviz.tracing.schema import Trace, TraceMeta

__all__ = ["RealShape", "REAL_SHAPES", "real_shape_trace"]


@dataclass(frozen=True)
class RealShape:
    name: str
    n_llm_layers: int  # decoder layers; injection at 1..n-1
    n_vision_states: int  # hidden states of the vision tower (index 0 = patch embedding)
    n_image_tokens: int
    n_prompt_tokens: int  # question words and chat template around the image


REAL_SHAPES = {
    "llava-1.5-7b": RealShape("llava-1.5-7b", 32, 25, 576, 40),
    "onevision-7b": RealShape("onevision-7b", 28, 27, 2900, 40),
}
QTYPES = ("color", "count", "position", "glyph", "shape", "size")


def real_shape_trace(
    shape: str | RealShape = "llava-1.5-7b",
    *,
    seed: int = 0,
    n_answer: int = 24,
    n_image_tokens: int | None = None,
    sample_id: str | None = None,
    qtype: str | None = None,
    sharpness: float = 2.0,
) -> Trace:
    """One validated trace at `shape` with random gates (rows sum to 1; `sharpness` scales the logits:
    larger = more peaked) and a `n_answer`-token answer whose last token is `<eos>`."""
    s = REAL_SHAPES.get(shape) if isinstance(shape, str) else shape
    if s is None:
        raise CLIVizError(f"unknown real shape {shape!r}; use one of {', '.join(REAL_SHAPES)}")
    if n_answer < 1:
        raise CLIVizError("a trace needs at least one answer token")
    rng = np.random.default_rng(seed)
    n_img = s.n_image_tokens if n_image_tokens is None else n_image_tokens
    n_prompt = s.n_prompt_tokens
    n_tokens = 1 + n_img + n_prompt + (n_answer - 1)  # <bos>, image, prompt, every answer token but the last
    roles = ["prompt"] + ["image"] * n_img + ["prompt"] * n_prompt + ["answer"] * (n_answer - 1)
    injection = list(range(1, s.n_llm_layers))
    vision = list(range(s.n_vision_states))
    L, K = len(injection), len(vision)
    bias = rng.normal(0, sharpness, size=(L, 1, K)).astype(np.float32)  # each layer prefers some vision layers
    logits = bias + rng.normal(0, 0.5, size=(L, n_tokens, K)).astype(np.float32)
    logits -= logits.max(-1, keepdims=True)
    gates = np.exp(logits)
    gates /= gates.sum(-1, keepdims=True)  # [L, T, K]
    words = [f"w{i}" for i in range(n_answer - 1)] + ["<eos>"]
    answer_positions = np.arange(n_tokens - n_answer, n_tokens, dtype=np.int64)
    top_k = 5
    topk_logprobs = -np.sort(rng.random((n_answer, top_k), dtype=np.float32) * 5, axis=1)
    qt = qtype or QTYPES[seed % len(QTYPES)]
    trace = Trace(
        meta=TraceMeta(
            question=f"synthetic {qt} question {seed} ?",
            answer=" ".join(words[:-1]),
            model=f"synthetic/{s.name}",
            config_hash=f"synthetic-{s.name}",
            fusion="cli",
            vision_layers=vision,
            injection_layers=injection,
            image_sha256=f"{seed:064x}"[-64:],
            image_width=336,
            image_height=336,
            device="cpu",
            dtype="bfloat16",
            created_at="2026-01-01T00:00:00+00:00",
            cliviz_version=__version__,
            qtype=qt,
            reference_answer=words[0],
            sample_id=sample_id if sample_id is not None else f"synthetic-{seed}",
        ),
        token_ids=rng.integers(3, 32000, size=n_tokens, dtype=np.int64),
        token_texts=["<bos>"] + ["<image>"] * n_img + [f"p{i}" for i in range(n_prompt)] + words[:-1],
        token_roles=roles,
        gates=gates.astype(np.float32),
        injection_norm=rng.random((L, n_tokens), dtype=np.float32),
        answer_ids=rng.integers(3, 32000, size=n_answer, dtype=np.int64),
        answer_texts=words,
        answer_positions=answer_positions,
        answer_logprobs=topk_logprobs[:, 0].copy(),
        topk_ids=rng.integers(3, 32000, size=(n_answer, top_k), dtype=np.int64),
        topk_texts=[[f"alt{j}" for j in range(top_k)] for _ in range(n_answer)],
        topk_logprobs=topk_logprobs,
    )
    trace.validate()
    return trace
