"""What a run trains: the model it starts from, which of its parameters learn, and how fast.

Starting points (`TrainSettings.init_from`):
- none: a tiny model of `fusion` from scratch, on the bundled word-level tokenizer;
- a cliviz CLI folder (`cliviz attach` output, or an earlier run): trained as it is;
- a plain LLaVA / LLaVA-OneVision folder, or a cliviz `projector` model: CLI (`fusion`) is
  attached first — identical to its base at init — and then trained, as the paper trains CLI's
  modules on top of a pretrained LLaVA.

Trainable parts (`TrainSettings.trainable`, `all` or a comma list): `cli` = AMP's LoRAs, the read's
keys/values and the AGF layers (gates, reads, injections); `projector` = the LLaVA projector (and
OneVision's newline embedding); `llm` = the language model and its head; `vision` = the vision
tower. Everything else is frozen (`requires_grad=False`), so its weights stay bit-identical.

`alpha` (the `tanh(alpha)` that opens each injection) gets its own parameter group: at init it is
0, so the injection adds nothing and no other CLI weight has a gradient — only alpha does (about
1e-4 on a real LLaVA). AdamW moves a parameter by about its learning rate per step whatever the
gradient's size, so alpha leaves zero at `alpha_lr` per step from step 0; its group has no warmup
(warmup would hold the whole CLI at zero for its length) and no weight decay (which would pull the
gate shut).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from cliviz.errors import CLIVizError
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.train.settings import TrainSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PART_PREFIXES = {
    "cli": ("amp.", "read_kv.", "agf."),
    "projector": ("base.model.multi_modal_projector.", "base.model.image_newline"),
    "llm": ("base.model.language_model.", "base.lm_head."),
    "vision": ("base.model.vision_tower.",),
}


def build_model(
    settings: TrainSettings, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[CLIForConditionalGeneration, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` at the run's starting point, weights in `dtype`, on `device` (a tiny model
    from scratch: on the CPU)."""
    if settings.init_from is None:
        from cliviz.data.tokenizer import build_tokenizer
        from cliviz.train.tiny import tiny_config

        tokenizer: PreTrainedTokenizerBase = build_tokenizer()
        image_id = cast(int, tokenizer.convert_tokens_to_ids("<image>"))  # one token in, one id out
        config = tiny_config(settings.fusion, len(tokenizer), image_id, tokenizer.pad_token_id)
        model = CLIForConditionalGeneration(config)
        if settings.vision_from is not None:
            copy_vision_tower(Path(settings.vision_from), model)
        return model, tokenizer
    folder = Path(settings.init_from)
    model_type = _model_type(folder)
    if model_type in ("llava", "llava_onevision"):
        # the base is loaded onto the device and `attach` puts the CLI modules beside it
        return _attach_to_base(folder, model_type, settings, dtype, torch.device(device or "cpu"))
    from cliviz.model.loading import load_model

    model, tokenizer = load_model(folder, device=str(device or "cpu"), dtype=_dtype_name(dtype))
    if model.config.fusion == "projector" and settings.fusion != "projector":
        from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

        from cliviz.model.attach import attach

        config = model.config
        # a CLI model's base is one of modeling.BASE_CLASSES (its attribute is typed PreTrainedModel)
        assert isinstance(model.base, (LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration))
        cli = attach(model.base, fusion=settings.fusion, gate_temperature=config.gate_temperature)
        _keep_runtime(config, cli.config)
        cli.name_or_path = model.name_or_path
        return cli, tokenizer
    return model, tokenizer


def copy_vision_tower(folder: Path, model: CLIForConditionalGeneration) -> None:
    """Load the vision tower of a saved model (e.g. a stage-1 tower) into a fresh model: the rest of it
    (projector, LLM, CLI) keeps this run's own seeded init."""
    from cliviz.model.safety import no_stdin, refuse_remote_code

    refuse_remote_code(folder)
    try:
        with no_stdin():
            source = CLIForConditionalGeneration.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise CLIVizError(f"cannot load the model in {folder}: {str(err).splitlines()[0]}") from None
    tower = source.base.model.vision_tower.state_dict()
    own = model.base.model.vision_tower.state_dict()
    if set(tower) != set(own) or any(tower[k].shape != own[k].shape for k in own):
        raise CLIVizError(f"the vision tower in {folder} does not match this architecture")
    model.base.model.vision_tower.load_state_dict(tower)


def _attach_to_base(
    folder: Path, model_type: str, settings: TrainSettings, dtype: torch.dtype, device: torch.device
) -> tuple[CLIForConditionalGeneration, PreTrainedTokenizerBase]:
    """A plain LLaVA folder (`model_type` a key of BASE_CLASSES, as its config.json says): load it
    (safetensors only) straight onto `device` (a torchrun rank never holds the 7B base in host
    memory), attach CLI, and bring its tokenizer and processor."""
    from cliviz.model.attach import attach
    from cliviz.model.loading import load_image_processor, load_tokenizer
    from cliviz.model.modeling import BASE_CLASSES
    from cliviz.model.safety import no_stdin, refuse_remote_code

    refuse_remote_code(folder)
    cls = BASE_CLASSES[model_type]
    try:
        with no_stdin():
            base = cls.from_pretrained(
                folder, use_safetensors=True, dtype=dtype, device_map=device, trust_remote_code=False
            )
    except (OSError, ValueError, RuntimeError) as err:
        raise CLIVizError(f"cannot load the base model in {folder}: {str(err).splitlines()[0]}") from None
    model = attach(base, fusion=settings.fusion)
    tokenizer = load_tokenizer(folder, model.config)
    processor = load_image_processor(folder, model.config)
    if processor is not None:
        model.config.image_processor = processor
    model.name_or_path = str(folder)
    return model, tokenizer


def _keep_runtime(old, new) -> None:
    processor = getattr(old, "image_processor", None)
    if processor is not None:
        new.image_processor = processor


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise CLIVizError(f"--init-from {folder} holds no readable config.json") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def select_trainable(model: CLIForConditionalGeneration, policy: str) -> list[str]:
    """Freeze everything outside `policy` and cast what trains to float32 (master weights); the names
    of the trained parameters. Raises CLIVizError when the policy finds nothing to train."""
    from cliviz.train.settings import parts_of

    prefixes = tuple(p for part in parts_of(policy) for p in PART_PREFIXES[part])
    names = []
    for name, param in model.named_parameters():
        train = policy == "all" or name.startswith(prefixes)
        param.requires_grad_(train)
        if train:
            names.append(name)
            if param.dtype != torch.float32:
                param.data = param.data.float()
    if not names:
        raise CLIVizError(
            f"nothing to train: this {model.config.fusion} model has no {policy} parameters "
            "(use --train all, or attach CLI first)"
        )
    return names


def param_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """AdamW groups: the injection gates' alpha (own lr, no warmup, no decay), then the rest."""
    alphas: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (alphas if name.endswith("injection.alpha") else rest).append(param)
    groups = [{"params": rest, "lr": settings.lr, "weight_decay": settings.weight_decay, "name": "weights"}]
    if alphas:
        groups.append({"params": alphas, "lr": settings.alpha_lr, "weight_decay": 0.0, "name": "alpha"})
    return [g for g in groups if g["params"]]


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 5% over the budget (`progress` in [0, 1])."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_learning_rates(opt: torch.optim.Optimizer, settings: TrainSettings, progress: float, step: int) -> None:
    """Warmup + cosine for the weights; the same decay but no warmup for alpha."""
    for group in opt.param_groups:
        if group.get("name") == "alpha":
            group["lr"] = settings.alpha_lr * lr_factor(progress, step, 1)
        else:
            group["lr"] = settings.lr * lr_factor(progress, step, settings.warmup)
