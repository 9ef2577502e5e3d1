"""`CLIConfig`: a transformers config that wraps a LLaVA-family config and adds CLI's knobs.

Kept as a plain `PretrainedConfig` so that `save_pretrained`/`from_pretrained` work on a local
folder exactly as users of transformers expect (config.json + model.safetensors).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, LlavaConfig, LlavaOnevisionConfig, PretrainedConfig

FUSIONS = ("projector", "shallow", "deepstack", "cli")
READS = ("light", "full")
DEFAULT_READ_MAX_TOKENS = 1024
BASE_CONFIGS = {"llava": LlavaConfig, "llava_onevision": LlavaOnevisionConfig}
RUNTIME_ONLY = ("image_processor",)  # attributes set after loading, never serialised


class CLIConfig(PretrainedConfig):
    """Config of a Cross-Layer-Injection model.

    Args:
        base_config: the wrapped LLaVA / LLaVA-OneVision config (object or dict).
        fusion: one of `projector`, `shallow`, `deepstack`, `cli`.
        vision_layers: indices into the vision tower's `hidden_states` (0 = patch embedding).
        injection_layers: LLM decoder layers whose *input* receives the injection.
        lora_rank: rank of the per-vision-layer LoRA in AMP.
        gate_temperature: softmax temperature of the AGF gate.
        agf_read: `light` (docs/design.md §1: a low-rank read whose keys/values of the visual memory are
            computed once per image and shared by every injection layer) or `full` (the first
            design: D-wide query/key/value maps per injection layer, recomputed per token; the
            bundled `cli-tiny` and the other models trained before the light read use it). Every
            config.json names its read: `from_dict` refuses one without `agf_read` rather than
            guess an architecture (see `from_dict`).
        read_width: width r of the light read (default `default_read_width`: 32 per 1,024 of the
            LLM's hidden size, at least 32 — 128 for a 7B LLM, about 0.5% extra parameters).
        read_heads: heads of the read (default: one per 32 channels of the light read; the LLM's
            attention heads for the full read).
        amp_norm: a LayerNorm per vision layer in front of the shared projector. Off (the paper's
            `P(V_k) + B_k A_k V_k`); on only in checkpoints written before it was removed.
        read_max_tokens: the light read attends over at most this many memory positions per
            vision layer; a longer memory (LLaVA-OneVision's anyres images reach ~7,300 features)
            is average-pooled over neighbouring positions down to it, per image. It bounds the
            per-token cost of the read whatever the image size; None reads every position.
            LLaVA-1.5 (576 features) and the bundled models (64) are never pooled.
        read_position_code: add a fixed 2-D sin-cos code of each memory token's place in the image
            before the light read's key/value projection (`cliviz.model.position`), so that the read
            can say where what it attends to is. `attach` and new tiny models turn it on; a config
            without the field (a model trained before it) keeps the read it was trained with.
    """

    model_type = "cliviz_cli"
    base_config: PretrainedConfig  # always a config object once built (a dict is converted)
    sub_configs = {"base_config": AutoConfig}

    def __init__(
        self,
        base_config: PretrainedConfig | dict[str, Any] | None = None,
        fusion: str = "cli",
        vision_layers: list[int] | None = None,
        injection_layers: list[int] | None = None,
        lora_rank: int = 8,
        gate_temperature: float = 1.0,
        agf_read: str = "light",
        read_width: int | None = None,
        read_heads: int | None = None,
        amp_norm: bool = False,
        read_max_tokens: int | None = DEFAULT_READ_MAX_TOKENS,
        read_position_code: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(base_config, dict):
            base_type = base_config.get("model_type", "llava")
            if base_type not in BASE_CONFIGS:
                raise ValueError(f"unsupported base model_type {base_type!r}; expected one of {sorted(BASE_CONFIGS)}")
            base: PretrainedConfig = BASE_CONFIGS[base_type](**base_config)
        elif base_config is None:
            base = LlavaConfig()
        else:
            # PretrainedConfig.__init__ rewrites sub-configs (e.g. the attention implementation);
            # never let that reach the config object a live base model is still using.
            base = copy.deepcopy(base_config)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
        if agf_read not in READS:
            raise ValueError(f"unknown agf_read {agf_read!r}; expected one of {', '.join(READS)}")
        self.base_config = base
        self.fusion = fusion
        n_vision = base.vision_config.num_hidden_layers
        n_text = base.text_config.num_hidden_layers
        text_hidden = base.text_config.hidden_size
        if vision_layers is None:
            vision_layers = [n_vision] if fusion == "deepstack" else list(range(1, n_vision + 1))
        if injection_layers is None:
            injection_layers = [] if fusion == "projector" else list(range(1, n_text))
        self.vision_layers = [int(k) for k in vision_layers]
        self.injection_layers = [int(i) for i in injection_layers]
        for k in self.vision_layers:
            if not 0 <= k <= n_vision:
                raise ValueError(f"vision layer {k} outside 0..{n_vision}")
        for i in self.injection_layers:
            if not 0 <= i < n_text:
                raise ValueError(f"injection layer {i} outside 0..{n_text - 1}")
        self.lora_rank = int(lora_rank)
        self.gate_temperature = float(gate_temperature)
        self.agf_read = agf_read
        self.amp_norm = bool(amp_norm)
        if agf_read == "light":
            self.read_width = int(read_width or default_read_width(text_hidden))
            self.read_heads = int(read_heads or max(1, self.read_width // 32))
        else:
            self.read_width = text_hidden
            self.read_heads = int(read_heads or base.text_config.num_attention_heads)
        self.read_max_tokens = None if read_max_tokens is None else int(read_max_tokens)
        if self.read_max_tokens is not None and self.read_max_tokens < 1:
            raise ValueError(f"read_max_tokens must be positive or None, got {read_max_tokens}")
        self.read_position_code = bool(read_position_code)
        if self.read_position_code and agf_read != "light":
            raise ValueError("read_position_code needs the light read (agf_read='light')")
        if self.read_width < 1 or self.read_heads < 1 or self.read_width % self.read_heads:
            raise ValueError(f"read width {self.read_width} is not a positive multiple of {self.read_heads} read heads")
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> CLIConfig:
        """A saved config (config.json) must name its AGF read: the two reads are different
        architectures, and no default can tell which one a checkpoint was trained with. The other
        read fields take the constructor's defaults when absent (`amp_norm` False, `read_max_tokens`
        1,024, `read_position_code` False); `save_pretrained` writes them all. A config written
        before `agf_read` existed describes the first design: add `"agf_read": "full",
        "amp_norm": true, "read_max_tokens": null` to it (as the bundled models' configs do)."""
        if "agf_read" not in config_dict:
            raise ValueError(
                'config.json does not name its AGF read (agf_read): add "agf_read": "light" for a model '
                'trained with the light read, or "agf_read": "full", "amp_norm": true, "read_max_tokens": null '
                "for one trained before it"
            )
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """As transformers serialises it, minus runtime-only attributes.

        `load_model` may set `image_processor` (the checkpoint's transformers image processor) on the
        config object so that every consumer of `pixel_values(images, config)` reaches it; it lives
        in `preprocessor_config.json` next to the weights, so it never goes into config.json or the
        config hash.
        """
        out = super().to_dict()
        for key in RUNTIME_ONLY:
            out.pop(key, None)
        return out

    @property
    def base_model_type(self) -> str:
        return self.base_config.model_type

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        return self.base_config.get_text_config()

    def shallow_map(self) -> list[int]:
        """Position in `vision_layers` that each injection layer reads in the static one-to-one wiring.

        Shallow LLM layers read shallow vision layers, spread evenly: the wiring the paper's
        "shallow-layer injection" baseline uses.
        """
        n_inj, k = len(self.injection_layers), len(self.vision_layers)
        if n_inj <= 1:
            return [0] * n_inj
        return [round(j * (k - 1) / (n_inj - 1)) for j in range(n_inj)]


def default_read_width(text_hidden: int) -> int:
    """32 channels per 1,024 of the LLM width (128 at 4,096), at least 32.

    Sized by the budget in docs/design.md §1: at 128 the read adds about 0.5% parameters to
    LLaVA-1.5-7B and about 2% FLOPs per decoded token (`benchmarks/bench_cli_cost.py`).
    """
    return 32 * max(1, round(text_hidden / 1024))
