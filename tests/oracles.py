"""Test oracles: the slow, obvious versions the fast code is held equal to (not part of the library)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import pandas as pd
import torch
from PIL import Image

from cliviz.analyses.ablations.effects import effects_frame
from cliviz.intervene.layout import layout_samples, suppressed
from cliviz.intervene.measures import score_row
from cliviz.intervene.spec import REFERENCE, grid_conditions
from cliviz.model.processing import image_inputs
from cliviz.tracing.record import envoy


@torch.no_grad()
def naive_knockout_grid(
    model,
    tokenizer,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    references: Sequence[str | None] | None,
    *,
    qtypes: Sequence[str | None] | None = None,
    tokens: str = "all",
    n_boot: int = 1000,
    seed: int = 0,
    **_: Any,
) -> pd.DataFrame:
    """`knockout_grid` the slow, obvious way: a Python loop of one unpadded forward per (cell,
    sample), the knockout written out by hand inside each trace. For benchmarks and identity tests."""
    conditions = grid_conditions(model, "knockout", tokens)
    pixels = image_inputs(list(images), model.config)
    samples = layout_samples(model, tokenizer, questions, references, qtypes, pixels.token_counts)
    suppress = suppressed(tokenizer)
    wrapped = envoy(model)
    cfg = model.config
    image_id = model.image_token_id
    records, mass = [], None
    for s, sample in enumerate(samples):
        ids = torch.tensor([sample.fed], device=model.device)
        pix = pixels.select([s]).to_model(model.device, model.dtype)
        pos = list(range(len(sample.prompt) - 1, len(sample.prompt) - 1 + sample.n_answer))
        tok_mask = torch.from_numpy(sample.token_mask(tokens, image_id)).to(model.device)
        own = None
        base = None
        for a in conditions:
            with wrapped.trace(input_ids=ids, attention_mask=torch.ones_like(ids), **pix):
                if a is None:
                    gates = nnsight.save([wrapped.agf[j].gate.output.float() for j in range(len(model.agf))])
                else:
                    j = model.injection_position(a.llm_layers[0])
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
            res = score_row(lp, sample, own, suppress)
            if a is None:
                base = res
            records.append(
                {
                    "sample": s,
                    "condition": REFERENCE if a is None else a.label,
                    "qtype": qtypes[s] if qtypes is not None else None,
                    "delta_logprob_ref": res["logprob_ref"] - base["logprob_ref"],
                    "delta_logprob_ref_seq": res["logprob_ref_seq"] - base["logprob_ref_seq"],
                    "delta_logprob_own": res["logprob_own"] - base["logprob_own"],
                    "flipped": res["flipped"],
                    "correct": res["correct"],
                }
            )
    scores = pd.DataFrame.from_records(records)
    return effects_frame(
        scores,
        conditions,
        gate_mass=mass,
        injection_layers=cfg.injection_layers,
        vision_layers=cfg.vision_layers,
        n_boot=n_boot,
        seed=seed,
    )
