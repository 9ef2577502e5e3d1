"""The causal check that travels with every gate map: does the injection matter for *this* question?

A gate map says where each LLM layer reads vision from; it does not say whether the model uses what
it reads. So every `trace` also measures, for the very (image, question) it shows, what happens when
the injection is switched off in every injection layer (`Ablation("injection_off")`): the model's
own first answer token is scored teacher-forced with and without the injection, in one call of the
batched ablation engine (`score_conditions`: its unablated reference row plus one ablated row per
sample — no generation). Recorded per trace:

- `answer_off`: the argmax first answer token with the injection off (special tokens suppressed, as
  in generation);
- `changed`: whether it differs from the model's own first answer token;
- `delta_logprob`: log p_off(own first token) − log p(own first token), in nats (≤ 0 when the
  injection helped the answer, ≈ 0 when it did not matter).

`matters` is `changed or |delta_logprob| >= NEGLIGIBLE_NATS`. A map whose injection does not matter
is routing, not importance, and every view says so. `map_kind_note` names what a static model's map
is (`shallow`: fixed one-to-one wiring; `deepstack`: ungated, all ones by construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def causal_checks(model, tokenizer, images: Sequence, questions: Sequence[str]) -> list[CausalCheck] | None:
    """One `CausalCheck` per (image, question), from ONE batched call of the ablation engine; None for a
    model without injection (`projector`)."""
    from cliviz.intervene import Ablation, score_conditions

    if len(getattr(model, "agf", ())) == 0:
        return None
    n = len(questions)
    frame = score_conditions(
        model,
        tokenizer,
        list(images),
        list(questions),
        None,
        [None, Ablation("injection_off", name="injection off")],
        max_batch=max(2 * n, 1),
    )
    off = frame[frame["condition"] == "injection off"].sort_values("sample")
    eos = tokenizer.eos_token
    return [
        CausalCheck(
            answer_off="" if row.answer == eos else str(row.answer),
            changed=bool(row.flipped),
            delta_logprob=float(row.delta_logprob_own),
        )
        for row in off.itertuples()
    ]
