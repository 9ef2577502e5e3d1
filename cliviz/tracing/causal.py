"""The causal check that travels with every gate map: does the injection matter for *this* answer?

A gate map says where each LLM layer reads vision from; it does not say whether the model uses what
it reads. So every `trace` also measures, for the very (image, question) it shows and the very
answer it shows, what happens when the injection is switched off in every injection layer. The
answer `trace` generated (within the run's `max_new_tokens`, eos dropped) is fed teacher-forced
through the base LLaVA alone — the CLI model with every injection off is exactly its base — in one
batched forward with logits at the answer positions only: no second generation, and the answer
scored is the one on screen. Its log-probabilities with the injection on are the ones the trace
recorded while generating it. Recorded per trace:

- `answer_off`: the argmax first answer token with the injection off (special tokens suppressed, as
  in generation);
- `changed`: whether it differs from the model's own first answer token;
- `delta_logprob`: log p_off(shown answer) − log p(shown answer), summed over its tokens, in nats
  (≤ 0 when the injection helped the answer, ≈ 0 when it did not matter).

`matters` is `changed or |delta_logprob| >= NEGLIGIBLE_NATS`. A map whose injection does not matter
is routing, not importance, and every view says so. `map_kind_note` names what a static model's map
is (`shallow`: fixed one-to-one wiring; `deepstack`: ungated, all ones by construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NEGLIGIBLE_NATS = 0.1  # |Δ log-prob| below this (a < 10% relative change of p) and no flip: "does not matter"


@dataclass(frozen=True)
class CausalCheck:
    """Effect of switching the injection off (all injection layers) on one question's first answer token."""

    answer_off: str
    changed: bool
    delta_logprob: float

    @property
    def matters(self) -> bool:
        return self.changed or abs(self.delta_logprob) >= NEGLIGIBLE_NATS

    def summary(self, own_token: str) -> str:
        """One line for terminals, pages and the dashboard; `own_token`: the model's own first answer token."""
        shown = own_token or "(empty)"
        effect = (
            f"the answer changes from {shown!r} to {self.answer_off!r}"
            if self.changed
            else f"the answer stays {shown!r}"
        )
        line = f"injection off (all layers): {effect}, Δ log-prob {self.delta_logprob:+.3f}"
        if self.matters:
            return line + " — the injection matters for this answer."
        return line + (
            " — the injection does not matter here: this map shows routing, not importance "
            f"(|Δ| < {NEGLIGIBLE_NATS} nats, no change)."
        )


def map_kind_note(fusion: str, injection_layers: Sequence[int] = (), vision_layers: Sequence[int] = ()) -> str | None:
    """What a map of this fusion variant is, when it is not a learned per-token choice (None for `cli`)."""
    if fusion == "projector":
        return "projector model: no gates and no injection (plain LLaVA path), so there is no gate map."
    if fusion == "deepstack":
        last = vision_layers[-1] if len(vision_layers) else "the final"
        return (
            f"deepstack model: ungated — vision layer {last} is added at the image tokens of every injection "
            "layer; the map is all ones by construction, not a choice."
        )
    if fusion == "shallow":
        return (
            "shallow model: static one-to-one wiring — each LLM layer always reads one fixed vision layer; "
            "the map shows the wiring, not a per-token choice."
        )
    return None


def causal_checks(
    model,
    tokenizer,
    inputs: dict[str, torch.Tensor],
    answers: Sequence[Sequence[int]],
    answer_logprobs: Sequence[torch.Tensor],
) -> list[CausalCheck] | None:
    """One `CausalCheck` per traced row, from ONE teacher-forced forward of the base with the shown
    answers; None for a model without injection (`projector`).

    `inputs`: the trace's model inputs (left-padded prompts `[B, W]` and image tensors); `answers`: the
    answer ids each row generated (eos included or not); `answer_logprobs`: per row, the recorded
    log-probs `[n_steps, V]` of its generation steps (injection on)."""
    import torch

    from cliviz.inference import suppressed_tokens

    if len(getattr(model, "agf", ())) == 0:
        return None
    eos = tokenizer.eos_token_id
    scored = [_scored_ids(list(a), eos) for a in answers]  # each [n_b]: the shown answer, eos dropped
    off = _injection_off_logprobs(model, inputs, scored)  # each [n_b, V]
    suppress = suppressed_tokens(tokenizer)
    checks = []
    for ids, lp_off, lp_on in zip(scored, off, answer_logprobs):
        index = torch.tensor(ids)
        on = lp_on[: len(ids)].float().gather(-1, index[:, None]).sum()
        first = lp_off[0].clone()
        first[suppress] = -torch.inf
        top = int(first.argmax())
        checks.append(
            CausalCheck(
                answer_off="" if top == eos else tokenizer.convert_ids_to_tokens(top),
                changed=top != ids[0],
                delta_logprob=float(lp_off.gather(-1, index[:, None]).sum() - on),
            )
        )
    return checks


def _scored_ids(answer: list[int], eos: int | None) -> list[int]:
    """The shown answer without its eos; an answer that is only eos is scored as that eos."""
    cut = answer[: answer.index(eos)] if eos in answer else answer
    return cut or answer[:1]


def _injection_off_logprobs(model, inputs: dict[str, torch.Tensor], answers: list[list[int]]) -> list[torch.Tensor]:
    """log p `[n_b, V]` (float32, CPU) of each row's answer positions, teacher-forced through the base
    alone (every injection off). Prompts stay left-padded as traced; answers follow them, right-padded."""
    import torch

    from cliviz.model import modeling

    prompts, prompt_mask = inputs["input_ids"], inputs["attention_mask"]  # [B, W]
    b, w = prompts.shape
    longest = max(len(a) for a in answers)
    fed = torch.cat([prompts, prompts.new_zeros(b, longest - 1)], dim=1)  # [B, W + n - 1]
    mask = torch.cat([prompt_mask, prompt_mask.new_zeros(b, longest - 1)], dim=1)
    scored = torch.zeros_like(fed, dtype=torch.bool)  # [B, W + n - 1]: positions that predict an answer token
    for row, ids in enumerate(answers):
        fed[row, w : w + len(ids) - 1] = torch.tensor(ids[:-1], dtype=fed.dtype)
        mask[row, w : w + len(ids) - 1] = 1
        scored[row, w - 1 : w - 1 + len(ids)] = True
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generation numbers left-padded rows
    images = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
    if "pixel_values" in images:
        images["pixel_values"] = images["pixel_values"].to(model.dtype)
    token = modeling._CURRENT.set(None)  # no visual context: every injection hook passes through
    try:
        with torch.no_grad():
            out = model.base(
                input_ids=fed,
                attention_mask=mask,
                position_ids=position_ids,
                logits_to_keep=scored,
                use_cache=False,
                **images,
            )
    finally:
        modeling._CURRENT.reset(token)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1).cpu()  # [P, V], rows in order
    return list(torch.split(logprobs, [len(a) for a in answers]))
