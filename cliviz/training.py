"""Train a tiny CLI model (any fusion variant) on ShapesVQA from scratch.

What makes a ~1 M-parameter VLM learn on two CPU cores (see the model card for numbers):
- init scale 0.1 instead of transformers' 0.02 (0.02 stays at chance);
- every question about an image in one sequence (loss on answers only): about 8 answers per image;
- an auxiliary per-patch loss on the last vision layer (colour, shape, digit under each patch, the
  patch's row and column, and the centre of the object under it), so the vision features are
  useful before the language model has learned to route (without row/column targets, left/right
  stayed at chance). It plays the part of the vision tower's pretraining objective, which in CLIP
  also sits on the last layer while LLaVA reads the penultimate one (`vision_feature_layer=-2`).
  On the penultimate layer instead (`--aux-layer -2`) the projector baseline fell from 0.97 to
  0.93 while CLI stayed at 1.00; with either choice CLI's injection ends up nearly unused at
  inference (see the model card);
- more questions per image for the types that learn slowest (several object pairs for relation,
  both axes for position): relation was the last type under the bar;
- linear warmup then cosine decay, scheduled on the fraction of the budget (steps or minutes).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from cliviz.data.dataset import scene_with_questions
from cliviz.data.questions import QA, QUESTION_TYPES
from cliviz.data.scenes import CENTER_BIN, COLORS, IMAGE_SIZE, SHAPES, Scene, patch_labels
from cliviz.data.tokenizer import build_tokenizer
from cliviz.model.configuration import CLIConfig
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.model.processing import n_image_tokens, pixel_values
from cliviz.train_state import STATE_FILE, SavedState, restore, write_train_state

PATCH = 8
SUMMARY_FILE = "training_summary.json"
VISION_LAYERS = 6  # encoder layers of the tiny CLIP tower: hidden_states 0 (patch embedding) .. 6


def tiny_config(fusion: str, vocab_size: int, image_token_id: int, pad_token_id: int) -> CLIConfig:
    """The bundled tiny architecture: CLIP 64 px / patch 8 (6 layers) + Llama 128-d (4 layers)."""
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=VISION_LAYERS, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, initializer_range=0.1,
    )
    text = LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=256,
        initializer_range=0.1, tie_word_embeddings=False, pad_token_id=pad_token_id,
    )
    base = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    return CLIConfig(base_config=base, fusion=fusion, lora_rank=8, gate_temperature=1.0)


@dataclass
class TrainSettings:
    fusion: str = "cli"
    seed: int = 0
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    aux_weight: float = 0.5
    weight_decay: float = 0.01
    init_from: str | None = None  # continue from a saved model (fresh optimiser and schedule)
    data_offset: int = 0  # first scene index, so that a continuation sees new scenes
    position_aux: bool = True  # row/column/object-centre targets in the auxiliary loss
    extra_questions: str = "relation:2,position:1"  # more questions per image, "type:count,..."
    aux_layer: int = -1  # vision hidden_states index the auxiliary loss supervises (-1: the last layer)
    start_step: int = 0  # resume an interrupted --steps run: schedule and scenes continue from this step
    stop_step: int | None = None  # stop early on a --steps schedule (a checkpoint partway through it)


class AuxHeads(nn.Module):
    """Per-patch classifiers on the final vision layer; training-only, never saved with the model."""

    def __init__(self, hidden: int, position: bool = True) -> None:
        super().__init__()
        self.position = position
        self.color = nn.Linear(hidden, len(COLORS) + 1)
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.digit = nn.Linear(hidden, 11)
        self.row = nn.Linear(hidden, IMAGE_SIZE // PATCH)  # keeps where a patch is in its features
        self.col = nn.Linear(hidden, IMAGE_SIZE // PATCH)
        self.center_x = nn.Linear(hidden, IMAGE_SIZE // CENTER_BIN + 1)  # where its object is
        self.center_y = nn.Linear(hidden, IMAGE_SIZE // CENTER_BIN + 1)


def parse_extra_questions(spec: str) -> dict[str, int]:
    """`"relation:2,position:1"` -> `{"relation": 2, "position": 1}`; raises ValueError on nonsense."""
    extra: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if name not in QUESTION_TYPES or not count.isdigit():
            raise ValueError(f"bad extra-questions entry {part!r}: want type:count with a type among {', '.join(QUESTION_TYPES)}")
        extra[name] = int(count)
    return extra


def training_questions(scene: Scene, qas: list[QA], extra: dict[str, int], rng: np.random.Generator) -> list[QA]:
    """`qas` plus up to `extra[type]` further questions of each type about the same scene.

    A question asks the same thing as another when it holds the same set of words ("is the red
    object above or below the blue object ?" and its mirror, for instance): those are skipped,
    so extra relation questions are about other pairs of objects.
    """
    seen = {frozenset(qa.question.split()) for qa in qas}
    out = list(qas)
    for qtype, count in extra.items():
        added = 0
        for _ in range(4 * count):  # a few draws; small scenes simply have fewer pairs
            if added == count:
                break
            qa = QUESTION_TYPES[qtype](scene, rng)
            if qa is None or frozenset(qa.question.split()) in seen:
                continue
            seen.add(frozenset(qa.question.split()))
            out.append(qa)
            added += 1
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def make_batch(
    tokenizer, config: CLIConfig, seed: int, indices: list[int], extra: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """One multi-turn sequence per scene: `<bos> <image>*N (question answer <eos>)*`."""
    n_img = n_image_tokens(config)
    image_id = config.base_config.image_token_id
    rows, targets, images, aux = [], [], [], {}
    for index in indices:
        scene, qas = scene_with_questions(seed, index)
        if extra:
            qas = training_questions(scene, qas, extra, np.random.default_rng([seed, index, 1]))
        ids = [tokenizer.bos_token_id] + [image_id] * n_img
        tgt = [-100] * len(ids)
        for qa in qas:
            q = tokenizer(qa.question, add_special_tokens=False).input_ids
            a = tokenizer.convert_tokens_to_ids(qa.answer)
            ids += q + [a, tokenizer.eos_token_id]
            tgt += [-100] * len(q) + [a, tokenizer.eos_token_id]  # label at its own position; shifted in the loss
        rows.append(ids)
        targets.append(tgt)
        images.append(scene.image)
        for name, grid in patch_labels(scene, PATCH).items():
            aux.setdefault(name, []).append(torch.from_numpy(grid.reshape(-1)))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, tgt) in enumerate(zip(rows, targets)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(tgt)] = torch.tensor(tgt)
        mask[i, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values(images, config)}
    batch.update({f"aux_{k}": torch.stack(v) for k, v in aux.items()})
    return batch


def lr_factor(progress: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(
    settings: TrainSettings,
    out: Path,
    device: torch.device,
    on_step: Callable[[int, float, float, float], None] | None = None,
    resume: SavedState | None = None,
    save_dtype: torch.dtype = torch.float32,
) -> dict:
    """Train and save to `out` (config, safetensors, tokenizer, `training_log.jsonl`); returns a summary.

    Checkpoints every few minutes, model and full training state (`train_state.safetensors`), so an
    interrupted run leaves a usable model and `resume` (its `read_train_state`) continues the same run
    exactly. `settings` must then be the saved run's own (`settings_from_state`).
    """
    if (settings.steps is None) == (settings.minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    if settings.start_step and settings.steps is None:
        raise ValueError("start_step resumes a --steps run only")
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    tokenizer = build_tokenizer()
    config = tiny_config(settings.fusion, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    if resume is not None:
        config = CLIConfig.from_dict(resume.config)
        model = CLIForConditionalGeneration(config)
    elif settings.init_from:
        model = CLIForConditionalGeneration.from_pretrained(settings.init_from, use_safetensors=True)
        if model.config.fusion == "projector" and settings.fusion != "projector":
            # CLI on top of a trained baseline, as the paper does with LLaVA: `attach` keeps the
            # baseline exactly (alpha = 0) and training then learns what to inject.
            from cliviz.model.attach import attach

            model = attach(model.base, fusion=settings.fusion, lora_rank=config.lora_rank,
                           read_width=config.read_width, read_heads=config.read_heads,
                           gate_temperature=config.gate_temperature)
        elif model.config.fusion != settings.fusion:
            raise ValueError(f"--init-from holds a {model.config.fusion} model, not {settings.fusion}")
        config = model.config
    else:
        model = CLIForConditionalGeneration(config)
    model = model.to(device).train()
    heads = AuxHeads(config.base_config.vision_config.hidden_size, settings.position_aux).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)
    step, seconds_before, resumed_at = settings.start_step, 0.0, []
    earlier_rows: list[dict] = []
    if resume is not None:
        restore(resume, model, heads, opt)
        step, seconds_before, resumed_at = resume.step, resume.seconds, resume.resumed_at + [resume.step]
        earlier_rows = earlier_log_rows(resume.run, resume.step)
    elif settings.start_step and settings.init_from:
        earlier_rows = earlier_log_rows(Path(settings.init_from), settings.start_step)
        seconds_before = earlier_rows[-1]["seconds"] if earlier_rows else 0.0
        resumed_at = [settings.start_step]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "training_log.jsonl", "w", encoding="utf-8")
    log.writelines(json.dumps(row) + "\n" for row in earlier_rows)  # a resumed run's log tells the whole run
    start = time.monotonic()
    last_save = start
    recent_loss: deque[float] = deque(resume.recent("loss") if resume else (), maxlen=50)
    recent_acc: deque[float] = deque(resume.recent("acc") if resume else (), maxlen=50)
    extra = parse_extra_questions(settings.extra_questions)
    scene_index = settings.data_offset + step * settings.batch_size

    def elapsed() -> float:
        return round(seconds_before + time.monotonic() - start, 1)

    def fraction_done() -> float:
        return step / settings.steps if settings.steps else elapsed() / (settings.minutes * 60)

    def save_state() -> None:
        window = {"loss": list(recent_loss), "acc": list(recent_acc)}
        write_train_state(out, model, heads, opt, asdict(settings), step, elapsed(), resumed_at, window)

    def checkpoint() -> None:
        _save(model, tokenizer, out)
        save_state()

    while True:
        progress = fraction_done()
        if progress >= 1.0 or step == settings.stop_step:
            break
        for group in opt.param_groups:
            group["lr"] = settings.lr * lr_factor(progress, step - settings.start_step, settings.warmup)
        indices = list(range(scene_index, scene_index + settings.batch_size))
        scene_index += settings.batch_size
        batch = {k: v.to(device) for k, v in make_batch(tokenizer, config, settings.seed * 1_000_003 + 17, indices, extra).items()}
        out_model = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        )
        logits = out_model.logits[:, :-1]  # [B, T-1, V]
        labels = batch["labels"][:, 1:]  # [B, T-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        aux_loss = _aux_loss(heads, out_model.vision_hidden_states[settings.aux_layer][:, 1:], batch)  # CLS dropped
        total = loss + settings.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            answer = (labels != -100) & (labels != tokenizer.eos_token_id)
            acc = (logits.argmax(-1)[answer] == labels[answer]).float().mean().item()
        recent_loss.append(loss.item())
        recent_acc.append(acc)
        step += 1
        mean_loss, mean_acc = float(np.mean(recent_loss)), float(np.mean(recent_acc))
        if on_step:
            on_step(step, mean_loss, mean_acc, min(fraction_done(), 1.0))
        if step % 25 == 0:
            row = {"step": step, "seconds": elapsed(), "loss": round(mean_loss, 4), "acc": round(mean_acc, 4)}
            log.write(json.dumps(row | ({"resumed": True} if resumed_at else {})) + "\n")
            log.flush()
        if time.monotonic() - last_save > 300:
            checkpoint()
            last_save = time.monotonic()
    log.close()
    finished = fraction_done() >= 1.0
    if finished:
        (out / STATE_FILE).unlink(missing_ok=True)  # nothing left to resume; keeps shipped folders small
    else:
        save_state()  # stopped early (--stop-step): resumable
    _save(model.to(save_dtype), tokenizer, out)
    summary = {
        "settings": asdict(settings), "steps": step - settings.start_step, "seconds": round(time.monotonic() - start, 1),
        "final_train_acc": float(np.mean(recent_acc)) if recent_acc else None,
        "saved_dtype": str(save_dtype).removeprefix("torch."),
    }
    if resumed_at:
        summary |= {"resumed_at": resumed_at, "total_seconds": elapsed()}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def settings_from_state(state: SavedState, stop_step: int | None = None) -> TrainSettings:
    """The saved run's own settings, to carry it on to `stop_step` (None: the end of its schedule)."""
    settings = TrainSettings(**state.settings)
    total = settings.steps
    if stop_step is not None and (total is None or not state.step < stop_step <= total):
        raise ValueError(f"--stop-step must lie after the saved step {state.step} and at most the run's {total} steps")
    settings.stop_step = stop_step
    return settings


def recorded_seed(model_dir: str | Path) -> int | None:
    """The seed `train` recorded in a model folder's training_summary.json (None if absent), so
    `compare` can tell two checkpoints of one run from two seeds."""
    try:
        seed = json.loads((Path(model_dir) / SUMMARY_FILE).read_text())["settings"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return seed if isinstance(seed, int) else None


def earlier_log_rows(run: Path, up_to_step: int) -> list[dict]:
    """The log rows of an interrupted run up to the step a continuation starts from.

    A crash can leave a half-written last line; the log is a record, not state, so such lines are skipped.
    """
    path = run / "training_log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= up_to_step:
            rows.append(row)
    return rows


def _aux_loss(heads: AuxHeads, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-patch classification losses on one vision layer's patch states `hidden` `[B, N, Dv]`."""
    loss = 0.0
    for name in ("color", "shape", "digit"):
        logits = getattr(heads, name)(hidden)  # [B, N, C]
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[f"aux_{name}"].reshape(-1))
    if not heads.position:
        return loss
    grid = IMAGE_SIZE // PATCH
    index = torch.arange(grid * grid, device=hidden.device)  # raster order of the patches
    for name, target in (("row", index // grid), ("col", index % grid)):
        logits = getattr(heads, name)(hidden)  # [B, N, grid]
        loss = loss + F.cross_entropy(logits.reshape(-1, grid), target.repeat(hidden.shape[0]))
    for name in ("center_x", "center_y"):
        logits = getattr(heads, name)(hidden)  # [B, N, bins + 1]
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[f"aux_{name}"].reshape(-1))
    return loss


def _save(model: CLIForConditionalGeneration, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
