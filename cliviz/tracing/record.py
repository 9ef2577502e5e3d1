"""Record gates through nnsight while the model generates.

The model is wrapped once with `nnsight.NNsight`; inside one `trace(fn=generate)` the loop over
`tracer.iter[:max_new_tokens]` saves, at every step, each AGF layer's gate output
(`[B, T, K]` at prefill, `[B, 1, K]` after), the norm of its injection output, and the LM head's
logits. Generation that ends early (every row hit `<eos>`) simply cuts the loop short: the values
saved so far are kept (nnsight's documented behaviour), and the generated ids come from a second,
input-free invoke reading `tracer.result`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import nnsight
import numpy as np
import torch
from PIL import Image

import cliviz
from cliviz.arguments import (
    check_flag,
    check_max_new_tokens,
    check_optional_list,
    check_request,
    check_requests,
    check_text,
    check_top_k,
    warn,
)
from cliviz.finite import require_finite
from cliviz.inference import decode_answer, default_max_new_tokens, generation_kwargs, prepare_inputs, token_texts
from cliviz.intervene.envoy import envoy
from cliviz.model.loading import config_hash
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.tracing.causal import causal_checks
from cliviz.tracing.schema import Trace, TraceMeta

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ImageLike = Image.Image | np.ndarray | str | os.PathLike  # what `cliviz.inputs.as_image` takes


def image_sha256(image: Image.Image) -> str:
    """Hash of the decoded RGB pixels and size: the same picture gives the same hash in any format."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _record(model: CLIForConditionalGeneration, inputs: dict, gen_kwargs: dict, steps: int):
    """One traced generate: per-step gate outputs, injection norms, logits, and the final ids."""
    wrapped = envoy(model)
    n_layers = len(model.agf)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with wrapped.trace(fn=functools.partial(model.generate, **gen_kwargs)) as tracer:
            with tracer.invoke(**inputs):
                gates = nnsight.save([])
                norms = nnsight.save([])
                logits = nnsight.save([])
                for _ in tracer.iter[:steps]:
                    step_gates, step_norms = [], []
                    for j in range(n_layers):
                        step_gates.append(wrapped.agf[j].gate.output.float())
                        step_norms.append(wrapped.agf[j].injection.output.float().norm(dim=-1))
                    gates.append(step_gates)
                    norms.append(step_norms)
                    logits.append(wrapped.base.lm_head.output[:, -1].float())
            with tracer.invoke():
                sequences = tracer.result.save()
    return gates, norms, logits, sequences


@torch.no_grad()
def trace_batch(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    *,
    max_new_tokens: int | None = None,
    top_k: int = 5,
    qtypes: list[str | None] | None = None,
    references: list[str | None] | None = None,
    sample_ids: list[str | None] | None = None,
    causal_check: bool = False,
) -> list[Trace]:
    """Generate answers for a batch and return one `Trace` per (image, question).

    `max_new_tokens` defaults to `default_max_new_tokens` (4 for the bundled models, 256 for real
    checkpoints); generation stops earlier when every row has emitted eos. Arguments are checked
    first (`cliviz.arguments.check_requests`: images may be PIL images, arrays or paths; questions
    are normalised as the command line does); a bad one raises `CLIVizError` naming it, and an image
    unlike the model's training scenes gives a `CLIVizWarning`. `causal_check=True` also
    measures, for every row, the effect of switching the injection off (`cliviz.tracing.causal`):
    one teacher-forced forward of the answers shown, no generation.
    """
    requests = check_requests(model, tokenizer, images, questions)
    pictures, questions = [r.image for r in requests], [r.question for r in requests]  # decoded PIL images
    max_new_tokens = check_max_new_tokens(max_new_tokens) or default_max_new_tokens(tokenizer)
    top_k = check_top_k(top_k, len(tokenizer))
    qtypes = check_optional_list(qtypes, "qtypes", len(questions), "question types")
    references = check_optional_list(references, "references", len(questions), "reference answers")
    sample_ids = check_optional_list(sample_ids, "sample_ids", len(questions), "sample ids")
    causal_check = check_flag(causal_check, "causal_check")
    warn([w for r in requests for w in r.warnings])
    inputs = prepare_inputs(model, tokenizer, pictures, questions)
    gates, norms, logits, sequences = _record(
        model, inputs, generation_kwargs(tokenizer, max_new_tokens), max_new_tokens
    )
    recorded = _Recorded(model, inputs, gates, norms, logits, sequences)
    checks = None
    if causal_check:
        shown = [recorded.row(b, tokenizer.eos_token_id, model)[1] for b in range(len(questions))]
        checks = causal_checks(model, tokenizer, inputs, shown, list(recorded.logprobs))
    shared = _shared_meta(model)
    traces = []
    for b in range(len(questions)):
        prompt, row, g, nrm = recorded.row(b, tokenizer.eos_token_id, model)
        meta = TraceMeta(
            question=questions[b],
            answer=decode_answer(tokenizer, row),
            image_sha256=image_sha256(pictures[b]),
            image_width=pictures[b].width,
            image_height=pictures[b].height,
            qtype=qtypes[b] if qtypes else None,
            reference_answer=references[b] if references else None,
            sample_id=sample_ids[b] if sample_ids else None,
            injection_off_answer=checks[b].answer_off if checks else None,
            injection_off_changed=checks[b].changed if checks else None,
            injection_off_delta_logprob=checks[b].delta_logprob if checks else None,
            **shared,
        )
        trace = _row_trace(meta, tokenizer, model.image_token_id, prompt, row, g, nrm, recorded.logprobs[b], top_k)
        trace.validate()
        traces.append(trace)
    return traces


class _Recorded:
    """One traced generate of a batch, on the CPU: prompts, generated ids, per-step log-probs, and
    the gates / injection norms of the prefill and of every later step."""

    def __init__(self, model, inputs: dict, gates: list, norms: list, logits: list, sequences: torch.Tensor) -> None:
        require_finite(torch.stack(logits, dim=1), "answer scores", model)  # [B, n_steps, V]
        self.prompt_ids = inputs["input_ids"].cpu()  # [B, prompt_width]
        self.mask = inputs["attention_mask"].cpu()  # [B, prompt_width]
        self.generated = sequences[:, self.prompt_ids.shape[1] :].cpu()  # [B, n_steps]
        self.n_steps = len(logits)
        self.logprobs = torch.log_softmax(torch.stack(logits, dim=1), dim=-1).cpu()  # [B, n_steps, V]
        has_gates = bool(gates) and bool(gates[0])
        self.prefill_gates = torch.stack(gates[0], dim=0).cpu() if has_gates else None  # [L, B, T, K]
        self.prefill_norms = torch.stack(norms[0], dim=0).cpu() if has_gates else None  # [L, B, T]
        self.later_gates = [torch.stack(g, 0)[:, :, -1].cpu() for g in gates[1:]] if has_gates else []  # [L, B, K]
        self.later_norms = [torch.stack(n, 0)[:, :, -1].cpu() for n in norms[1:]] if has_gates else []  # [L, B]

    def row(self, b: int, eos_id: int | None, model) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
        """`(prompt ids, answer ids up to eos, gates [L, n_tokens, K], norms [L, n_tokens])` of row b,
        left padding dropped; the last answer token is never fed back, so it has no gate row."""
        generated = self.generated[b, : self.n_steps].tolist()
        n_answer = generated.index(eos_id) + 1 if eos_id in generated else len(generated)
        start = int((self.mask[b] == 0).sum())  # left padding
        prompt = self.prompt_ids[b, start:].tolist()
        n_fed = len(prompt) + n_answer - 1
        if self.prefill_gates is None:
            k = len(model.config.vision_layers)
            return prompt, generated[:n_answer], torch.zeros(0, n_fed, k), torch.zeros(0, n_fed)
        assert self.prefill_norms is not None  # recorded with the gates
        later = slice(0, n_answer - 1)
        g = torch.cat([self.prefill_gates[:, b, start:], *[s[:, b : b + 1] for s in self.later_gates[later]]], dim=1)
        nrm = torch.cat([self.prefill_norms[:, b, start:], *[s[:, b : b + 1] for s in self.later_norms[later]]], dim=1)
        require_finite(g, "gate values", model)  # [L, n_tokens, K], padding left out
        return prompt, generated[:n_answer], g, nrm


def _shared_meta(model: CLIForConditionalGeneration) -> dict:
    """The meta fields every trace of a batch shares (the config hash once: serialising it is not free)."""
    return {
        "model": str(getattr(model, "name_or_path", "") or ""),
        "config_hash": config_hash(model),
        "fusion": model.config.fusion,
        "vision_layers": list(model.config.vision_layers),
        "injection_layers": list(model.config.injection_layers),
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cliviz_version": cliviz.__version__,
    }


def _row_trace(
    meta: TraceMeta,
    tokenizer: PreTrainedTokenizerBase,
    image_id: int,
    prompt: list[int],
    answer: list[int],
    gates: torch.Tensor,
    norms: torch.Tensor,
    step_logprobs: torch.Tensor,
    top_k: int,
) -> Trace:
    """One row's `Trace`: the fed tokens with their roles, the answer's log-probs and top-k."""
    n_answer = len(answer)
    fed = prompt + answer[: n_answer - 1]
    lp = step_logprobs[:n_answer]  # [n_answer, V]
    answer_ids = torch.tensor(answer)
    top = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
    roles = ["image" if t == image_id else "prompt" for t in prompt] + ["answer"] * (n_answer - 1)
    return Trace(
        meta=meta,
        token_ids=np.asarray(fed, dtype=np.int64),
        token_texts=token_texts(tokenizer, fed),
        token_roles=roles,
        gates=gates.numpy().astype(np.float32),
        injection_norm=norms.numpy().astype(np.float32),
        answer_ids=answer_ids.numpy().astype(np.int64),
        answer_texts=token_texts(tokenizer, answer),
        answer_positions=np.arange(len(prompt) - 1, len(prompt) - 1 + n_answer, dtype=np.int64),
        answer_logprobs=lp.gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1).numpy().astype(np.float32),
        topk_ids=top.indices.numpy().astype(np.int64),
        topk_texts=[token_texts(tokenizer, r) for r in top.indices.tolist()],
        topk_logprobs=top.values.numpy().astype(np.float32),
    )


def trace(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image: ImageLike,
    question: str,
    *,
    max_new_tokens: int | None = None,
    top_k: int = 5,
    qtype: str | None = None,
    reference: str | None = None,
    causal_check: bool = True,
) -> Trace:
    """Answer one question and record every gate, with the map's causal check (`trace.causal`:
    the effect of switching the injection off for this question; `causal_check=False` skips it).

    `image`: a PIL image, a numpy array or a path. The question goes through the same check as on
    the command line (`cliviz.inputs.check_model_question`: for the bundled models, words outside
    the vocabulary are refused and a missing " ?" is added); `trace.meta.question` holds it as read.
    Example::

        from cliviz import load_image, load_model, trace
        model, tok = load_model()
        t = trace(model, tok, load_image("assets/examples/color.png"), "what color is the triangle ?")
        t.meta.answer                         # 'blue'
        assert t.gates.shape == (len(t.meta.injection_layers), t.n_tokens, len(t.meta.vision_layers))
        t.causal                              # CausalCheck(answer_off='blue', changed=False, delta_logprob=...)
        fig = t.heatmap(token=0)              # plotly Figure: the gates that produced answer token 0
    """
    request = check_request(model, tokenizer, image, question)  # messages name `image` / `question`
    check_text(qtype, "qtype", optional=True)
    check_text(reference, "reference", optional=True)
    return trace_batch(
        model,
        tokenizer,
        [request.image],
        [request.question],
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        qtypes=[qtype],
        references=[reference],
        causal_check=causal_check,
    )[0]
