"""`CLIForConditionalGeneration`: a transformers LLaVA-family model with Cross-Layer Injection.

The wrapped model (`self.base`, a stock `LlavaForConditionalGeneration` or
`LlavaOnevisionForConditionalGeneration`) runs unchanged. CLI adds:
- `self.amp`: projects the selected vision layers into the LLM space once per image;
- `self.agf[j]`: one AGF layer per injection layer, applied to the *input* of LLM decoder layer
  `injection_layers[j]` by a forward pre-hook, so the base's module tree and weight names stay
  exactly the base's (a CLI checkpoint is the base checkpoint plus `amp.*` and `agf.*`).

The per-call visual memory reaches the hooks through a `ContextVar`, never through module
state, so one loaded model can serve concurrent requests (the dashboard does).

Hook points (one name each, used everywhere in cliviz):
`agf.<j>.gate` (output `[batch, seq, K]`), `agf.<j>.gate.to_logits` (pre-softmax logits),
`agf.<j>.injection` (residual update `[batch, seq, D]`).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from cliviz.model.agf import AGFLayer, DeepStackLayer
from cliviz.model.amp import AMP
from cliviz.model.configuration import CLIConfig

BASE_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration}


@dataclass
class _VisualContext:
    """What the decoder pre-hooks need for one forward call."""

    memory: torch.Tensor | None  # [B, K, N, D] AMP output (cli, shallow)
    image_embeds: torch.Tensor | None  # [B, T, D] image features at their token positions (deepstack)
    image_mask: torch.Tensor | None  # [B, T] True at image-token positions


_CURRENT: contextvars.ContextVar[_VisualContext | None] = contextvars.ContextVar("cliviz_visual", default=None)


@dataclass
class CLIOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    vision_memory: torch.Tensor | None = None
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None  # every vision layer, at prefill only


class CLIPreTrainedModel(PreTrainedModel):
    config_class = CLIConfig
    base_model_prefix = "cli"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only CLI's own modules land here; the wrapped LLaVA initialises itself (smart_apply).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CLIForConditionalGeneration(CLIPreTrainedModel, GenerationMixin):
    """A LLaVA-family VLM whose LLM layers read many vision layers through gates.

    Example::

        from cliviz.model import load_model
        model, tokenizer = load_model()          # the bundled cli-tiny
        print(model.config.vision_layers, model.config.injection_layers)
    """

    def __init__(self, config: CLIConfig, base: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        base_cls = BASE_CLASSES.get(config.base_model_type)
        if base_cls is None:
            raise ValueError(f"unsupported base model_type {config.base_model_type!r}")
        # `attach` hands in an already-loaded base so that no second copy of its weights is built.
        self.base = base if base is not None else base_cls(config.base_config)
        if not isinstance(config.base_config.vision_feature_layer, int):
            raise ValueError("CLI reuses the LLaVA projector, which needs a single int vision_feature_layer")
        vision_hidden = config.base_config.vision_config.hidden_size
        text_hidden = config.base_config.text_config.hidden_size
        k = len(config.vision_layers)
        self.amp = AMP(vision_hidden, text_hidden, k, config.lora_rank) if config.fusion in ("cli", "shallow") else None
        if config.fusion in ("cli", "shallow"):
            statics = config.shallow_map() if config.fusion == "shallow" else [None] * len(config.injection_layers)
            self.agf = nn.ModuleList(
                AGFLayer(text_hidden, k, config.read_heads, config.gate_temperature, s) for s in statics
            )
        elif config.fusion == "deepstack":
            self.agf = nn.ModuleList(DeepStackLayer(text_hidden) for _ in config.injection_layers)
        else:
            self.agf = nn.ModuleList()
        self._hook_handles = [
            self.decoder_layers[layer].register_forward_pre_hook(self._make_hook(j), with_kwargs=True)
            for j, layer in enumerate(config.injection_layers)
        ]
        self.post_init()

    # -- structure ---------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.base.model.language_model.layers

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @property
    def image_token_id(self) -> int:
        return self.config.base_config.image_token_id

    # -- injection ---------------------------------------------------------------------------
    def _make_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            ctx = _CURRENT.get()
            if ctx is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
            if self.config.fusion == "deepstack":
                if ctx.image_embeds is None or ctx.image_embeds.shape[1] != hidden.shape[1]:
                    return None  # decode steps hold no image tokens
                update = self.agf[j](hidden, ctx.image_embeds) * ctx.image_mask.unsqueeze(-1).to(hidden.dtype)
            else:
                if ctx.memory is None:
                    return None
                update = self.agf[j](hidden, ctx.memory)  # [B, T, D]
            hidden = hidden + update
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None):
        """Run the vision tower once: the base's image features plus every vision hidden state."""
        base_cfg = self.config.base_config
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if self.config.base_model_type == "llava_onevision":
            kwargs["image_sizes"] = image_sizes
        return self.base.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=base_cfg.vision_feature_layer,
            vision_feature_select_strategy=base_cfg.vision_feature_select_strategy,
            **kwargs,
        )

    def vision_memory(self, image_outputs: Any, batch: int) -> torch.Tensor:
        """AMP over the selected vision layers: `[B, K, N, D]` (crops of one image concatenated)."""
        strategy = self.config.base_config.vision_feature_select_strategy
        states = []
        for k in self.config.vision_layers:
            hs = image_outputs.hidden_states[k]  # [B * crops, N(+1), Dv]
            if strategy == "default":
                hs = hs[:, 1:]
            if hs.shape[0] % batch:
                raise ValueError("CLI needs the same number of image crops for every sample in a batch")
            states.append(hs.reshape(batch, -1, hs.shape[-1]))  # [B, crops*N, Dv]
        return self.amp(states, self.base.model.multi_modal_projector)

    def _image_embeds_at_tokens(self, image_outputs: Any, input_ids: torch.Tensor, dtype: torch.dtype):
        features = torch.cat(list(image_outputs.pooler_output), dim=0)  # [n_image_tokens, D]
        mask = input_ids == self.image_token_id  # [B, T]
        aligned = torch.zeros(*input_ids.shape, features.shape[-1], dtype=dtype, device=features.device)
        aligned[mask] = features.to(dtype)
        return aligned, mask

    # -- forward / generate ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        vision_memory: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CLIOutput:
        mm_outputs = vision_states = None
        image_embeds = image_mask = None
        if pixel_values is not None:
            image_outputs = self.encode_images(pixel_values, image_sizes)
            mm_outputs = {"image": image_outputs}
            vision_states = image_outputs.hidden_states
            if self.amp is not None:
                vision_memory = self.vision_memory(image_outputs, input_ids.shape[0])
            if self.config.fusion == "deepstack":
                image_embeds, image_mask = self._image_embeds_at_tokens(image_outputs, input_ids, self.dtype)
        extra = {"image_sizes": image_sizes} if self.config.base_model_type == "llava_onevision" else {}
        token = _CURRENT.set(_VisualContext(vision_memory, image_embeds, image_mask))
        try:
            out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                mm_encoder_outputs=mm_outputs,
                **extra,
                **kwargs,
            )
        finally:
            _CURRENT.reset(token)
        return CLIOutput(
            loss=out.loss,
            logits=out.logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            vision_memory=vision_memory,
            vision_hidden_states=vision_states,
        )

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        # The visual memory is computed once at prefill and re-used by every decode step.
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if outputs.get("vision_memory") is not None:
            model_kwargs["vision_memory"] = outputs["vision_memory"]
        return model_kwargs
