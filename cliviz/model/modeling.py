"""`CLIForConditionalGeneration`: a transformers LLaVA-family model with Cross-Layer Injection.

The wrapped model (`self.base`, a stock `LlavaForConditionalGeneration` or
`LlavaOnevisionForConditionalGeneration`) runs unchanged. CLI adds:
- `self.amp`: projects the selected vision layers into the LLM space once per image; for
  LLaVA-OneVision the projected crops are then packed per image exactly as the base packs its own
  image features (anyres grid, unpadding, newline tokens), so AMP reads what the LLM sees;
- `self.read_kv`: the keys and values of that visual memory (light read), computed once per image
  and carried through generation in `VisionKeysValues` — never recomputed per token;
- `self.agf[j]`: one AGF layer per injection layer, applied to the *input* of LLM decoder layer
  `injection_layers[j]` by a forward pre-hook, so the base's module tree and weight names stay
  exactly the base's (a CLI checkpoint is the base checkpoint plus `amp.*`, `read_kv.*`, `agf.*`).

The per-call visual memory reaches the hooks through a `ContextVar`, never through module
state, so one loaded model can serve concurrent requests (the dashboard does).

Hook points (one name each, used everywhere in cliviz):
`agf.<j>.gate` (output `[batch, seq, K]`), `agf.<j>.gate.to_logits` (pre-softmax logits),
`agf.<j>.injection` (residual update `[batch, seq, D]`); `amp` (memory `[X, K, N, D]`) and
`read_kv` (keys, values `[batch, K*H, N, r/H]`). `model.agf_for(llm_layer)` maps a real LLM
layer index to its AGF module.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import (
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from cliviz.model import position
from cliviz.model.agf import AGFLayer, DeepStackLayer, MemoryKeysValues, pool_memory
from cliviz.model.amp import AMP
from cliviz.model.configuration import CLIConfig

BASE_CLASSES: dict[str, type[LlavaForConditionalGeneration] | type[LlavaOnevisionForConditionalGeneration]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}


@dataclass
class VisionKeysValues:
    """What every decode step needs of the image: the read's keys and values, per injection layer.

    The light read shares one (keys, values) pair across layers (the list holds the same tensors);
    the full read has its own per layer. `mask [B, 1, 1, N]` is None when no memory is padded.
    """

    keys: list[torch.Tensor]  # each [B, K*H, N, r/H]
    values: list[torch.Tensor]  # each [B, K*H, N, r/H]
    mask: torch.Tensor | None


@dataclass
class _VisualContext:
    """What the decoder pre-hooks need for one forward call."""

    kv: VisionKeysValues | None  # cli, shallow
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
    vision_memory: torch.Tensor | None = None  # [B, K, N, D] packed AMP output, at prefill
    vision_memory_mask: torch.Tensor | None = None  # [B, N] True at real memory positions (None: all)
    vision_kv: VisionKeysValues | None = None  # carried to the next decode step
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None  # every vision layer, at prefill only


class CLIPreTrainedModel(PreTrainedModel):
    config_class = CLIConfig
    config: CLIConfig
    base_model_prefix = "cli"
    main_input_name = "input_ids"
    input_modalities = ["image", "text"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """transformers' `from_pretrained`, for checkpoints of either alpha shape: a folder whose
        `model.safetensors` stores the injection gains as scalars (the first design) is read with
        each gain as the `[1]` vector the model holds (`weights.vector_alphas`). A folder never runs
        its own code: `trust_remote_code` is always False."""
        kwargs.pop("trust_remote_code", None)
        if kwargs.get("state_dict") is None and pretrained_model_name_or_path is not None:
            from cliviz.model.weights import vector_alphas  # weights builds models from this module

            folder = Path(pretrained_model_name_or_path)
            state = vector_alphas(folder / "model.safetensors")
            if state is not None:  # transformers takes a state dict in place of a folder, not with one
                if kwargs.get("config") is None:
                    kwargs["config"] = cls.config_class.from_pretrained(folder, trust_remote_code=False)
                model = super().from_pretrained(None, *model_args, state_dict=state, trust_remote_code=False, **kwargs)
                (model[0] if isinstance(model, tuple) else model).name_or_path = str(folder)
                return model
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, trust_remote_code=False, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # Only CLI's own modules land here; the wrapped LLaVA initialises itself (smart_apply).
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):  # AMP's B_k: the correction starts at nothing
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CLIForConditionalGeneration(CLIPreTrainedModel, GenerationMixin):
    """A LLaVA-family VLM whose LLM layers read many vision layers through gates.

    Example::

        from cliviz.model.loading import load_model
        model, tokenizer = load_model()          # the bundled cli-tiny
        print(model.config.vision_layers, model.config.injection_layers)
    """

    def __init__(self, config: CLIConfig, base: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        base_cls = BASE_CLASSES.get(config.base_model_type)
        if base_cls is None:
            raise ValueError(f"unsupported base model_type {config.base_model_type!r}")
        # `attach` hands in an already-loaded base so that no second copy of its weights is built.
        # base_config is the LlavaConfig / LlavaOnevisionConfig of base_model_type (typed as its PretrainedConfig)
        self.base = base if base is not None else base_cls(config.base_config)  # type: ignore[arg-type]
        if not isinstance(config.base_config.vision_feature_layer, int):
            raise ValueError("CLI reuses the LLaVA projector, which needs a single int vision_feature_layer")
        vision_hidden = config.base_config.vision_config.hidden_size
        text_hidden = config.base_config.text_config.hidden_size
        k = len(config.vision_layers)
        reads = config.fusion in ("cli", "shallow")
        light = config.agf_read == "light"
        self.amp = AMP(vision_hidden, text_hidden, k, config.lora_rank, norm=config.amp_norm) if reads else None
        self.read_kv = MemoryKeysValues(text_hidden, config.read_width, config.read_heads) if reads and light else None
        if reads:
            statics = config.shallow_map() if config.fusion == "shallow" else [None] * len(config.injection_layers)
            self.agf = nn.ModuleList(
                AGFLayer(
                    text_hidden,
                    k,
                    config.read_width,
                    config.read_heads,
                    config.gate_temperature,
                    s,
                    own_keys_values=not light,
                )
                for s in statics
            )
        elif config.fusion == "deepstack":
            self.agf = nn.ModuleList(DeepStackLayer(text_hidden) for _ in config.injection_layers)
        else:
            self.agf = nn.ModuleList()
        self._checkpointed = False  # see enable_gradient_checkpointing
        self._hook_handles = [
            self.decoder_layers[layer].register_forward_pre_hook(self._make_hook(j), with_kwargs=True)
            for j, layer in enumerate(config.injection_layers)
        ]
        self.post_init()

    # -- structure ---------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.base.model.language_model.layers

    def injection_position(self, llm_layer: int) -> int:
        """j such that `agf[j]` serves the real LLM layer `llm_layer` (`agf[j]` is `injection_layers[j]`,
        not layer j: `agf.0` is LLM layer 1 with the default wiring)."""
        try:
            return self.config.injection_layers.index(int(llm_layer))
        except ValueError:
            raise KeyError(
                f"LLM layer {llm_layer} takes no injection (injection layers: {self.config.injection_layers})"
            ) from None

    def agf_for(self, llm_layer: int) -> nn.Module:
        """The AGF module of a real LLM layer index (see `injection_position`)."""
        return self.agf[self.injection_position(llm_layer)]

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @property
    def image_token_id(self) -> int:
        return self.config.base_config.image_token_id

    @property
    def is_onevision(self) -> bool:
        return self.config.base_model_type == "llava_onevision"

    # -- injection ---------------------------------------------------------------------------
    def _inject(self, j: int, hidden: torch.Tensor, ctx: _VisualContext) -> torch.Tensor:
        """`hidden [B, T, D]` plus injection `j`'s update (unchanged when this call has nothing to inject)."""
        if self.config.fusion == "deepstack":
            if ctx.image_embeds is None or ctx.image_embeds.shape[1] != hidden.shape[1]:
                return hidden  # decode steps hold no image tokens
            assert ctx.image_mask is not None  # set with image_embeds (`_image_embeds_at_tokens`)
            update = self.agf[j](hidden, ctx.image_embeds) * ctx.image_mask.unsqueeze(-1).to(hidden.dtype)
        else:
            if ctx.kv is None:
                return hidden
            update = self.agf[j](hidden, ctx.kv.keys[j], ctx.kv.values[j], ctx.kv.mask)  # [B, T, D]
        return hidden + update

    def _make_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            ctx = _CURRENT.get()
            if ctx is None or self._checkpointing_now():
                return None  # checkpointed training: the layer's own checkpointed call injects
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
            hidden = self._inject(j, hidden, ctx)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _checkpointing_now(self) -> bool:
        return self._checkpointed and self.training and torch.is_grad_enabled()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (memory for time).

        The vision tower's layers use transformers' own checkpointing. Each decoder layer is
        checkpointed here as a whole, injection included: transformers checkpoints a layer's
        `forward`, while the injection runs in a forward pre-hook outside it, so with transformers'
        checkpointing alone every AGF layer would keep its activations (at 7B about half of what the
        checkpointed decoder layer gives back). Only each layer's input hidden state is kept."""
        self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        injection_at = {layer: j for j, layer in enumerate(self.config.injection_layers)}
        for i, layer in enumerate(self.decoder_layers):
            # replaced by the checkpoint below, which covers the injection (nn.Module's __setattr__ types
            # every value as a Tensor or Module)
            layer.gradient_checkpointing = False  # type: ignore[assignment]
            layer.forward = functools.partial(self._checkpointed_layer, layer, type(layer).forward, injection_at.get(i))
        self._checkpointed = True

    def _checkpointed_layer(self, layer: nn.Module, forward, j: int | None, *args, **kwargs):
        """Decoder layer `layer` (its injection `j` first, if any) under one non-reentrant checkpoint."""
        if not self._checkpointing_now():
            return forward(layer, *args, **kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")  # [B, T, D]
        rest = args[1:]
        kwargs = {**kwargs, "use_cache": False} if "use_cache" in kwargs else kwargs
        if kwargs.get("cache") is not None:
            kwargs["cache"] = None  # the recomputation would write the cache twice
        ctx = _CURRENT.get()

        def run(h: torch.Tensor):
            if j is not None and ctx is not None:
                h = self._inject(j, h, ctx)
            return forward(layer, h, *rest, **kwargs)

        return torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False)

    # -- the image side ------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None):
        """Run the vision tower once: the base's image features plus every vision hidden state."""
        base_cfg = self.config.base_config
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if self.is_onevision:
            if image_sizes is None:
                raise ValueError("LLaVA-OneVision needs image_sizes with pixel_values")
            kwargs["image_sizes"] = image_sizes
        return self.base.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=base_cfg.vision_feature_layer,
            vision_feature_select_strategy=base_cfg.vision_feature_select_strategy,
            **kwargs,
        )

    def image_outputs_from_states(self, states: tuple[torch.Tensor, ...]):
        """What `encode_images` returns, from the tower's hidden states of the images (LLaVA only):
        the same projector on the same layer, without running the tower again."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self.is_onevision:
            raise ValueError("cached vision states are supported for LLaVA (one crop per image) only")
        base_cfg = self.config.base_config
        selected = states[base_cfg.vision_feature_layer]  # [B, N(+1), Dv]
        if base_cfg.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        features = self.base.model.multi_modal_projector(selected)  # [B, N, D]
        return BaseModelOutputWithPooling(
            last_hidden_state=states[-1],
            pooler_output=list(features),  # type: ignore[arg-type]  # as get_image_features: one [N, D] per image
            hidden_states=states,
        )

    def vision_memory(
        self, image_outputs: Any, image_sizes: torch.Tensor | None = None, batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """AMP over the selected vision layers: memory `[B, K, N, D]` and its mask `[B, N]` (None: no padding).

        LLaVA: one image = one row of the tower's batch. OneVision: the crops of each image are
        packed as the base packs its image features, then images are right-padded to one length.
        """
        assert self.amp is not None  # cli and shallow fusion only: the others read no vision layers
        strategy = self.config.base_config.vision_feature_select_strategy
        states = []
        for k in self.config.vision_layers:
            hs = image_outputs.hidden_states[k]  # [X, N(+1), Dv]
            states.append(hs[:, 1:] if strategy == "default" else hs)
        projected = self.amp(states, self.base.model.multi_modal_projector)  # [X, K, N, D]
        if self.is_onevision:
            if image_sizes is None:
                raise ValueError("LLaVA-OneVision's vision memory needs image_sizes")
            return self._pack_onevision(projected, image_sizes)
        if batch is not None and projected.shape[0] != batch:
            raise ValueError(f"{projected.shape[0]} images for a batch of {batch} prompts")
        return projected, None

    def _pack_onevision(self, projected: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops `[X, K, n, D]` -> per-image memory `[B, K, N, D]` + mask `[B, N]`, through the base's
        own `pack_image_features`, one vision layer at a time: the base's path for each layer, and the
        anyres grid (unpadded, interpolated down for large images) held for one layer at once rather
        than for all K (a 1920x1080 image at 7B width: ~0.3 GB instead of ~8 GB of transients)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.config.base_config
        crops = [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in image_sizes
        ]
        x, k, n, d = projected.shape
        if sum(crops) != x:
            raise ValueError(f"the vision tower saw {x} crops, but image_sizes call for {sum(crops)}")
        newline = self.base.model.image_newline.to(projected.dtype)  # [D]
        memory = mask = None
        for j in range(k):
            per_image = [p[:, j] for p in torch.split(projected, crops)]  # each [crops_i, n, D]
            packed, _ = self.base.model.pack_image_features(
                per_image, image_sizes, image_newline=newline, vision_aspect_ratio=cfg.vision_aspect_ratio
            )  # each [N_i, D]
            if memory is None:
                width = max(f.shape[0] for f in packed)
                memory = projected.new_zeros(len(packed), k, width, d)  # [B, K, N, D]
                mask = torch.zeros(len(packed), width, dtype=torch.bool, device=projected.device)  # [B, N]
                for i, feats in enumerate(packed):
                    mask[i, : feats.shape[0]] = True
            for i, feats in enumerate(packed):
                memory[i, j, : feats.shape[0]] = feats
        assert memory is not None and mask is not None  # k >= 1: the config refuses an empty vision_layers
        return memory, mask

    def memory_coordinates(self, n_memory: int, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Where each memory token sits in its image: `[B or 1, N, 2]` (row, column in [0, 1]; NaN for
        CLS, newline and padding rows). LLaVA: the tower's patch grid; OneVision: the base crop's grid,
        then each high-resolution crop at its place in the full image, packed by the base's own path."""
        vision = self.config.base_config.vision_config
        grid = vision.image_size // vision.patch_size
        if not self.is_onevision:
            has_cls = self.config.base_config.vision_feature_select_strategy != "default"
            return position.llava_coordinates(n_memory, grid, has_cls).unsqueeze(0)
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision's memory positions need image_sizes")
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        cfg = self.config.base_config
        base = position.grid_coordinates(grid)  # [g*g, 2]
        per_image = []
        for size in image_sizes:
            crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, vision.image_size)
            coords = [base]
            if crops > 1:
                rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vision.image_size)
                for r in range(rows):
                    for c in range(cols):  # crop r*cols + c covers rows r*g.., columns c*g.. of the canvas
                        coords.append(torch.stack([(base[:, 0] + r) / rows, (base[:, 1] + c) / cols], dim=-1))
            per_image.append(torch.stack(coords))  # [crops, g*g, 2]
        newline = torch.full((2,), float("nan"))
        packed, _ = self.base.model.pack_image_features(
            per_image, image_sizes.cpu(), image_newline=newline, vision_aspect_ratio=cfg.vision_aspect_ratio
        )
        out = torch.full((len(packed), n_memory, 2), float("nan"))  # [B, N, 2]
        for i, coords in enumerate(packed):  # each [N_i, 2]
            out[i, : coords.shape[0]] = position.renormalise_high_res(coords, grid * grid, grid)
        return out

    def memory_keys_values(
        self, memory: torch.Tensor, mask: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None
    ) -> VisionKeysValues:
        """The read's keys and values of `memory [B, K, N, D]`: once per image, shared by every layer
        (light read, memory pooled to at most `read_max_tokens` positions) or per layer (full read).
        With `read_position_code` each memory token first gets the code of its place in the image."""
        if self.config.read_position_code:
            coords = self.memory_coordinates(memory.shape[2], image_sizes).to(memory.device)  # [B|1, N, 2]
            code = position.sincos_code(coords, memory.shape[-1]).to(memory.dtype)  # [B|1, N, D]
            memory = memory + code.unsqueeze(1)  # [B, K, N, D]
        if self.read_kv is not None:
            memory, mask = pool_memory(memory, mask, self.config.read_max_tokens)
        attn_mask = None if mask is None or bool(mask.all()) else mask[:, None, None, :]  # [B, 1, 1, N]
        if self.read_kv is not None:
            keys, values = self.read_kv(memory)
            n = len(self.agf)
            return VisionKeysValues([keys] * n, [values] * n, attn_mask)
        pairs = [cast(AGFLayer, agf).read.memory_keys_values(memory) for agf in self.agf]  # cli, shallow: AGF layers
        return VisionKeysValues([p[0] for p in pairs], [p[1] for p in pairs], attn_mask)

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
        vision_memory_mask: torch.Tensor | None = None,
        vision_kv: VisionKeysValues | None = None,
        vision_states: tuple[torch.Tensor, ...] | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CLIOutput:
        """LLaVA's forward with the injections. The visual memory comes, in order of precedence,
        from `pixel_values` or from the vision tower's `vision_states` of those pixels (a trainer
        with a frozen tower caches them), from a given `vision_memory` (attributions substitute
        it), or from `vision_kv`, the keys and values an earlier step computed (decode)."""
        mm_outputs = None
        image_embeds = image_mask = None
        if pixel_values is not None or vision_states is not None:
            if pixel_values is not None:
                image_outputs = self.encode_images(pixel_values, image_sizes)
            else:
                assert vision_states is not None  # the branch's condition
                image_outputs = self.image_outputs_from_states(vision_states)
            mm_outputs = {"image": image_outputs}
            vision_states = image_outputs.hidden_states
            if self.amp is not None:
                tokens = input_ids if input_ids is not None else inputs_embeds
                if tokens is None:
                    raise ValueError("pixel_values or vision_states need input_ids or inputs_embeds")
                batch = tokens.shape[0]
                vision_memory, vision_memory_mask = self.vision_memory(image_outputs, image_sizes, batch)
            if self.config.fusion == "deepstack":
                if input_ids is None:
                    raise ValueError("deepstack fusion places image features at the image tokens: it needs input_ids")
                image_embeds, image_mask = self._image_embeds_at_tokens(image_outputs, input_ids, self.dtype)
        if vision_memory is not None and self.amp is not None:
            vision_kv = self.memory_keys_values(vision_memory, vision_memory_mask, image_sizes)
        extra = {"image_sizes": image_sizes} if self.is_onevision else {}
        context = _VisualContext(vision_kv, image_embeds, image_mask)
        token = _CURRENT.set(context)
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
            vision_memory_mask=vision_memory_mask,
            vision_kv=vision_kv,
            vision_hidden_states=vision_states,
        )

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        # The keys and values of the visual memory are computed once at prefill and re-used by
        # every decode step; the memory itself is not needed again.
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if outputs.get("vision_kv") is not None:
            model_kwargs["vision_kv"] = outputs["vision_kv"]
            model_kwargs.pop("vision_memory", None)
            model_kwargs.pop("vision_memory_mask", None)
        return model_kwargs
