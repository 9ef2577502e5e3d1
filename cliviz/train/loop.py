"""The one training loop of `cliviz train`: build, step, checkpoint, finish.

`Trainer` serves both jobs (tiny models from scratch on generated ShapesVQA, CLI modules on a
frozen checkpoint with conversation data), in one process or under `torchrun` (DDP or FSDP, see
`cliviz.train.distributed`). Each step takes the next batch of the data stream
(`cliviz.data.loader`), computes the loss on the answer tokens only (labels -100 elsewhere), plus
the auxiliary patch loss when the tower of a tiny model trains, and updates the trainable
parameters (`cliviz.train.setup`). Every few minutes it writes the model and the full training
state (`cliviz.train.state`), so `--resume` continues the same run exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F

from cliviz.data.collate import IGNORE, collator_for_model
from cliviz.data.loader import Batch, ConversationStream, DataSummary, make_loader
from cliviz.train import distributed as dist_
from cliviz.train.precision import precision_for
from cliviz.train.records import TrainingLog, earlier_log_rows, write_model_card, write_summary
from cliviz.train.settings import TrainSettings, parts_of
from cliviz.train.setup import build_model, param_groups, select_trainable, set_learning_rates
from cliviz.train.state import STATE_FILE, SavedState, restore, write_train_state
from cliviz.train.tiny import AuxHeads, TowerHeads, aux_loss, scene_seed, tower_loss
from cliviz.train.vision_cache import VisionCache

if TYPE_CHECKING:
    from cliviz.model.modeling import CLIForConditionalGeneration

WINDOW = 50  # steps in the running loss/accuracy the progress bar and log show


@dataclass
class StepReport:
    """What the progress bar shows after a step."""

    step: int
    loss: float  # running mean over the last WINDOW steps
    acc: float  # running answer-token accuracy (eos excluded)
    fraction: float  # of the budget (steps or minutes)
    tokens_per_second: float


class Trainee(nn.Module):
    """The model plus its training-only heads, one module for DDP/FSDP and the optimiser.

    objective `answers`: the model's logits (and the auxiliary patch loss when `heads` are given);
    objective `tower`: the vision tower alone with its image-level heads (stage 1 of the staged recipe).
    """

    def __init__(
        self,
        model: CLIForConditionalGeneration,
        heads: AuxHeads | None,
        aux_layer: int,
        tower: TowerHeads | None = None,
        smooth: tuple[int, float] = (4, 1.0),
    ) -> None:
        super().__init__()
        self.model, self.heads, self.aux_layer = model, heads, aux_layer
        self.tower, self.smooth = tower, smooth

    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`inputs`: the batch's tensors, or in place of `pixel_values` the cached `vision_states` (a tuple)."""
        if self.tower is not None:
            pixels = inputs["pixel_values"].to(self.model.dtype)
            states = self.model.base.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            loss, accuracy = tower_loss(self.tower, states, inputs, *self.smooth)
            return {"loss": loss, "accuracy": accuracy}
        images = {k: inputs[k] for k in ("pixel_values", "image_sizes", "vision_states") if k in inputs}
        scored = labelled_positions(inputs["labels"])  # [B, T]: positions whose next token is a label
        out = self.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=scored, **images
        )
        result = {"logits": out.logits, "scored": scored}  # logits [P, V] at the P scored positions only
        if self.heads is not None and "aux_color" in inputs:
            result["aux"] = aux_loss(self.heads, out.vision_hidden_states[self.aux_layer][:, 1:], inputs)  # CLS dropped
        return result


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]` bool: the positions whose logits predict a label (the next token is not IGNORE).

    Only these reach the LM head: an image's 576 positions and the prompt never need the vocabulary
    projection, which at 7B costs more memory per token than a decoder layer."""
    scored = torch.zeros_like(labels, dtype=torch.bool)  # [B, T]
    scored[:, :-1] = labels[:, 1:] != IGNORE
    return scored


CE_CHUNK_ELEMENTS = 2**26  # logits per cross-entropy chunk (256 MB in float32)


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits [P, V]` (any float dtype) against `labels [P]`, in float32.

    Each chunk of positions is checkpointed, so its float32 log-softmax lives only while that chunk is
    computed (forward and backward) instead of for the whole batch."""
    rows = max(1, CE_CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    total = logits.new_zeros((), dtype=torch.float32)
    for lo, la in zip(logits.split(rows), labels.split(rows)):
        if torch.is_grad_enabled() and lo.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_ce_sum, lo, la, use_reentrant=False)
        else:
            total = total + _ce_sum(lo, la)
    return total


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum")


class Trainer:
    """One run: `Trainer(...).run()` trains to the budget and returns the summary."""

    def __init__(
        self,
        settings: TrainSettings,
        out: Path,
        device: torch.device,
        *,
        resume: SavedState | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        save_dtype: torch.dtype | None = None,
    ) -> None:
        settings.check()
        self.settings, self.out, self.on_step, self.resume = settings, out, on_step, resume
        self.where = dist_.init_distributed(device)
        self.device = dist_.device_for(device, self.where)
        torch.manual_seed(settings.seed + self.where.rank)
        np.random.seed(settings.seed)
        base_dtype = _base_dtype(settings.dtype, self.device)
        # straight onto this rank's device (from_pretrained's device_map): no host copy of the model per rank
        model, self.tokenizer = build_model(settings, base_dtype, self.device)
        self.model = model
        self.save_dtype = save_dtype or _stored_dtype(settings)
        self.trained = select_trainable(model, settings.trainable)
        if settings.objective == "tower":
            keep_position_code(model)
        if settings.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        vision_hidden = model.config.base_config.vision_config.hidden_size
        heads = tower = None
        if settings.objective == "tower":
            tower = TowerHeads(vision_hidden)
        elif settings.data is None and settings.aux_weight > 0 and settings.trainable == "all":
            heads = AuxHeads(vision_hidden, settings.position_aux)
        trainee = Trainee(
            model.train(), heads, settings.aux_layer, tower, (settings.smooth_from, settings.smooth_weight)
        )
        trainee = trainee.to(self.device)
        mode = "fsdp" if settings.distributed == "fsdp" else "ddp"
        self.trainee = dist_.wrap(trainee, self.where, mode, find_unused="vision" in parts_of(settings.trainable))
        self.opt = torch.optim.AdamW(param_groups(self.trainee, settings), betas=(0.9, 0.98))
        self.precision = precision_for(base_dtype, self.device)
        self.stepped = True  # False after a float16 step skipped for inf/nan gradients
        self.vision_cache = VisionCache(model) if settings.cache_vision else None
        self.step, self.seconds_before, self.resumed_at = settings.start_step, 0.0, []
        self.recent_loss: deque[float] = deque(maxlen=WINDOW)
        self.recent_acc: deque[float] = deque(maxlen=WINDOW)
        self.data = DataSummary(next_batch=settings.start_step * settings.grad_accum)
        earlier: list[dict] = []
        if resume is not None:
            restore(resume, self.trainee, self.opt)
            self._restore_scaler(resume)
            self.step, self.seconds_before = resume.step, resume.seconds
            self.resumed_at = resume.resumed_at + [resume.step]
            self.recent_loss.extend(resume.recent("loss"))
            self.recent_acc.extend(resume.recent("acc"))
            self.data = DataSummary.from_dict(resume.data, counts=self.where.main)
            earlier = earlier_log_rows(resume.run, resume.step)
        elif settings.start_step and settings.init_from:
            earlier = earlier_log_rows(Path(settings.init_from), settings.start_step)
            self.seconds_before = earlier[-1]["seconds"] if earlier else 0.0
            self.resumed_at = [settings.start_step]
        if settings.data is not None and resume is None:  # no data, no training: refused before writing
            self._require_data()
        out.mkdir(parents=True, exist_ok=True)
        self.log = TrainingLog(out, earlier, enabled=self.where.main)
        self.loader = self._loader()
        self.start = time.monotonic()

    def _restore_scaler(self, resume: SavedState) -> None:
        """The float16 loss scale where the saved run left it; a state without one (written before it
        was saved) still resumes, its scale starting afresh, and says so once."""
        if self.precision.load_scaler(resume.scaler) or not self.where.main:
            return
        from cliviz.arguments import warn

        start = self.precision.scaler.get_scale() if self.precision.scaler is not None else float("nan")
        warn(
            [
                f"the training state of {resume.run} holds no float16 loss scale (an older cliviz wrote "
                "it, or a run in another dtype): "
                f"the scale restarts at {start:g}, so the resumed run may skip or take steps the "
                "uninterrupted one would not"
            ]
        )

    # ------------------------------------------------------------------------------ data
    def _require_data(self) -> None:
        from cliviz.data.loader import require_usable_rows
        from cliviz.data.sources import open_source

        s = self.settings
        assert s.data is not None  # called for a data run only
        source = open_source(s.data, s.image_folder, s.allow_absolute_image_paths)
        require_usable_rows(source, collator_for_model(self.model.config, self.tokenizer, s.max_length), s.data)

    def _loader(self):
        from cliviz.data.questions import parse_extra_questions
        from cliviz.data.sources import ShapesSceneSource, open_source

        s = self.settings
        if s.data is None:
            source = ShapesSceneSource(
                scene_seed(s.seed),
                offset=s.data_offset,
                extra_questions=parse_extra_questions(s.extra_questions),
                pool=s.scene_pool,
                scene_labels=s.objective == "tower",
            )
        else:
            source = open_source(s.data, s.image_folder, s.allow_absolute_image_paths)
        collator = collator_for_model(self.model.config, self.tokenizer, s.max_length)
        stream = ConversationStream(
            source,
            collator,
            s.batch_size,
            seed=s.seed,
            shuffle=s.data is not None,
            shuffle_window=s.shuffle_window,
            start_batch=self.data.next_batch,
            rank=self.where.rank,
            world_size=self.where.world_size,
        )
        return make_loader(stream, num_workers=s.num_workers, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------------------ the loop
    def elapsed(self) -> float:
        return round(self.seconds_before + time.monotonic() - self.start, 1)

    def fraction_done(self) -> float:
        s = self.settings
        if s.steps:
            return self.step / s.steps
        # a wall-clock budget must end every process on the same step: the main process's clock decides
        seconds = dist_.all_sum([self.elapsed() if self.where.main else 0.0], self.where, self.device)[0]
        assert s.minutes is not None  # settings.check(): exactly one of steps or minutes
        return seconds / (s.minutes * 60)

    def run(self) -> dict:
        """Train to the budget (or `stop_step`), checkpointing as it goes; the run's summary."""
        last_save, tokens, t0 = time.monotonic(), 0, time.monotonic()
        batches = iter(self.loader)
        while True:
            group = list(itertools.islice(batches, self.settings.grad_accum))  # one optimiser step's micro-batches
            progress = self.fraction_done()
            if not group or progress >= 1.0 or self.step == self.settings.stop_step:
                break
            for batch in group:
                self.data.add(batch)
            tokens += self.train_step(group, progress)
            rate = tokens / max(time.monotonic() - t0, 1e-9)
            if self.on_step and self.where.main:
                self.on_step(StepReport(self.step, self.mean_loss, self.mean_acc, min(self.fraction_done(), 1.0), rate))
            if self.step % self.settings.log_every == 0:
                self.log.write(
                    {
                        "step": self.step,
                        "seconds": self.elapsed(),
                        "loss": round(self.mean_loss, 4),
                        "acc": round(self.mean_acc, 4),
                        "step_loss": self.last_loss,
                        "tokens_per_s": round(rate, 1),
                    }
                    | ({"resumed": True} if self.resumed_at else {})
                    | ({"skipped_step": True} if not self.stepped else {})
                )
            due = time.monotonic() - last_save > self.settings.checkpoint_minutes * 60
            if dist_.all_sum([1.0 if due and self.where.main else 0.0], self.where, self.device)[0]:
                self.checkpoint()
                last_save = time.monotonic()
        return self.finish()

    def train_step(self, batches: list[Batch], progress: float) -> int:
        """One optimiser step on `batches` (this process's micro-batches of one global step, gradients
        accumulated); its token count. The loss is normalised by the label tokens of every micro-batch
        of every process, so accumulating N micro-batches of b equals one batch of N*b."""
        s = self.settings
        set_learning_rates(self.opt, s, progress, self.step - s.start_step)
        counted = sum(b.size if s.objective == "tower" else b.label_tokens for b in batches)  # tower: images
        divisor, global_tokens = dist_.token_scale(counted, self.where, self.device)
        self.opt.zero_grad(set_to_none=True)
        ce_value = hits = total = 0.0
        for i, batch in enumerate(batches):
            with self._no_sync(i < len(batches) - 1):  # gradients all-reduced once, after the last micro-batch
                loss, stats = self._micro_batch(batch, divisor, len(batches))
                if global_tokens:
                    self.precision.backward(loss)
            ce_value, hits, total = ce_value + stats[0], hits + stats[1], total + stats[2]
        self.stepped = True
        if global_tokens:
            self.stepped = self.precision.step(self.opt, [p for p in self.trainee.parameters() if p.requires_grad])
        ce_all, hits_all, total_all = dist_.all_sum([ce_value, hits, total], self.where, self.device)
        self.last_loss = round(ce_all / max(global_tokens, 1), 6)
        self.recent_loss.append(self.last_loss)
        self.recent_acc.append(hits_all / max(total_all, 1.0))
        self.step += 1
        return sum(b.tokens for b in batches)

    def _micro_batch(
        self, batch: Batch, divisor: float, n_micro: int
    ) -> tuple[torch.Tensor, tuple[float, float, float]]:
        """The loss to back-propagate for one micro-batch and its (summed loss, hits, count) for the log."""
        s = self.settings
        if batch.size and s.objective == "tower":  # stage 1: image-level losses (a mean per process)
            with self.precision.autocast():
                out = self.trainee(batch.to(self.device).inputs)
            loss = out["loss"].float()
            stats = (float(loss.detach()) * batch.size, float(out["accuracy"]) * batch.size, float(batch.size))
            return loss * batch.size / divisor, stats
        if not batch.size:  # nothing usable in this slice: still take part in the gradient all-reduce
            zero = sum(p.sum() for p in self.trainee.parameters() if p.requires_grad) * 0.0
            assert isinstance(zero, torch.Tensor)  # select_trainable refused a model with nothing to train
            return zero, (0.0, 0.0, 0.0)
        inputs: dict[str, Any] = dict(batch.to(self.device).inputs)  # tensors, and vision_states (a tuple)
        if self.vision_cache is not None:  # a frozen tower: its states, computed once per sample
            inputs["vision_states"] = self.vision_cache.states(batch.ids, inputs.pop("pixel_values"))
        with self.precision.autocast():
            out = self.trainee(inputs)
        logits = out["logits"]  # [P, V]: only the positions that predict a label
        labels = inputs["labels"][:, 1:][out["scored"][:, :-1]]  # [P]
        ce = chunked_cross_entropy(logits, labels)
        loss = ce / divisor + (s.aux_weight * out["aux"].float() / n_micro if "aux" in out else 0.0)
        with torch.no_grad():
            answer = labels != self.tokenizer.eos_token_id
            hits, total = float((logits.argmax(-1)[answer] == labels[answer]).sum()), float(answer.sum())
        return loss, (float(ce.detach()), hits, total)

    def _no_sync(self, skip: bool):
        """DDP's `no_sync` on the micro-batches before the last (FSDP syncs each: correct, more traffic)."""
        if skip and isinstance(self.trainee, nn.parallel.DistributedDataParallel):
            return self.trainee.no_sync()
        return contextlib.nullcontext()

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.recent_loss)) if self.recent_loss else float("nan")

    @property
    def mean_acc(self) -> float:
        return float(np.mean(self.recent_acc)) if self.recent_acc else float("nan")

    # ------------------------------------------------------------------------------ saving
    def checkpoint(self) -> None:
        """The exact state to resume from, every `checkpoint_minutes`: trained weights and optimiser
        moments only (the frozen base is referenced through `init_from`, never rewritten)."""
        self.save_state()

    def save_state(self) -> None:
        data = self.data.reduced().to_dict()
        write_train_state(
            self.out,
            self.trainee,
            self.opt,
            config_json=self.model.config.to_json_string(use_diff=False),
            settings=self.settings.to_dict(),
            step=self.step,
            seconds=self.elapsed(),
            resumed_at=self.resumed_at,
            recent={"loss": list(self.recent_loss), "acc": list(self.recent_acc)},
            data=data,
            main=self.where.main,
            scaler=self.precision.scaler_state(),
        )

    def save_model(self, summary: dict | None = None) -> None:
        """The finished model folder, assembled beside its files and renamed into `out`, then verified;
        the state file is deleted only after that, and only when the run reached its end (see
        `cliviz.train.saving` for the order that makes a kill at any point lose nothing)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from cliviz.train import saving

        # full_state_dict: every value a whole tensor (torch types them as any state value)
        state = cast(
            "dict[str, torch.Tensor]",
            get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
        )
        summary = self.summary() if summary is None else summary  # a collective under DDP: every rank
        if not self.where.main:
            return
        init_from = Path(self.settings.init_from) if self.settings.init_from else None
        staging = saving.staging_folder(self.out)
        try:
            saving.stage_model(
                staging, self.model, self.tokenizer, state, self.save_dtype, set(self.trained), init_from
            )
            write_summary(staging, summary)
            if init_from is not None:
                write_model_card(self.out, summary, into=staging)
            expected = saving.saved_shapes(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        saving.commit(staging, self.out)
        saving.verify_model_folder(self.out, expected)

    def finish(self) -> dict:
        """The state at the last step, then the final model and summary; the state file is deleted once
        the model is verified, unless the run stopped early (--stop-step: resumable)."""
        self.log.close()
        finished = self.fraction_done() >= 1.0
        summary = self.summary()
        self.save_state()  # first: from here a kill anywhere leaves a resumable run
        self.save_model(summary)
        if finished and self.where.main:
            from cliviz.train.saving import delete_state

            delete_state(self.out, STATE_FILE)
        dist_.barrier(self.where)
        return summary

    def summary(self) -> dict:
        s = self.settings
        module = self.model  # the Trainee's model: DDP wraps the Trainee, FSDP shards it in place
        out = {
            "settings": s.to_dict(),
            "steps": self.step - s.start_step,
            "seconds": round(time.monotonic() - self.start, 1),
            "final_train_acc": self.mean_acc if self.recent_acc else None,
            "final_train_loss": round(self.mean_loss, 4) if self.recent_loss else None,
            "saved_dtype": str(self.save_dtype).removeprefix("torch."),
            "trained": s.trainable,
            "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in module.parameters()),
            "world_size": self.where.world_size,
            "device": str(self.device),
            "data": self.data.reduced().to_dict(),
        }
        if self.resumed_at:
            out |= {"resumed_at": self.resumed_at, "total_seconds": self.elapsed()}
        return out


def keep_position_code(model: CLIForConditionalGeneration) -> None:
    """Stage 1 gives the tower a fixed 2-D sin-cos position code (as MAE-style ViTs have) and never
    trains it. An image-level objective has no use for where a patch is: trained, the position
    embeddings fade until not even the shallow layers know where a patch is, and CLI finds no
    position anywhere to read. Fixed and as large as the patch embeddings, the code keeps position
    in the shallow layers; the top layers still lose it to the pull toward their mean."""
    from cliviz.train.tiny import sincos_position_code

    tower = model.base.model.vision_tower
    table = tower.embeddings.position_embedding.weight  # [1 + grid*grid, Dv]: CLS first
    grid = int(round((table.shape[0] - 1) ** 0.5))
    with torch.no_grad():
        pixels = torch.rand(8, 3, tower.config.image_size, tower.config.image_size) * 2 - 1
        patch_norm = tower.embeddings.patch_embedding(pixels).flatten(2).norm(dim=1).mean()  # typical token size
        code = sincos_position_code(grid, table.shape[1])  # [grid*grid, Dv], unit rows
        table[0].zero_()
        table[1:] = code * patch_norm
    table.requires_grad_(False)


def train(
    settings: TrainSettings,
    out: Path,
    device: torch.device,
    on_step: Callable[[StepReport], None] | None = None,
    resume: SavedState | None = None,
    save_dtype: torch.dtype | None = None,
) -> dict:
    """Train and save to `out` (config, safetensors, tokenizer, `training_log.jsonl`); returns a summary."""
    return Trainer(settings, out, device, resume=resume, on_step=on_step, save_dtype=save_dtype).run()


def settings_from_state(state: SavedState, stop_step: int | None = None) -> TrainSettings:
    """The saved run's own settings, to carry it on to `stop_step` (None: the end of its schedule)."""
    settings = TrainSettings.from_dict(state.settings)
    total = settings.steps
    if stop_step is not None and (total is None or not state.step < stop_step <= total):
        raise ValueError(f"--stop-step must lie after the saved step {state.step} and at most the run's {total} steps")
    settings.stop_step = stop_step
    return settings


def _base_dtype(name: str, device: torch.device) -> torch.dtype:
    from cliviz.runtime import resolve_device

    return resolve_device(str(device), name)[1]


def _stored_dtype(settings: TrainSettings) -> torch.dtype:
    """Save in the dtype the starting checkpoint was stored in (float32 from scratch)."""
    if settings.init_from is None:
        return torch.float32
    import json

    try:
        raw = json.loads((Path(settings.init_from) / "config.json").read_text(encoding="utf-8"))
        name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name), torch.float32)
    except (OSError, ValueError):
        return torch.float32
