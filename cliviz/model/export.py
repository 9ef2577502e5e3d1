"""Export a bundled `projector` model as a plain LLaVA folder, so `cliviz attach` can be tried offline.

`projector-tiny` is a CLI model with no injection: a `LlavaForConditionalGeneration` wrapped in
`CLIForConditionalGeneration`. Saved on its own, with the files a llava-hf checkpoint carries, it is
an ordinary LLaVA folder (`model_type: llava`) that any LLaVA tool — and `cliviz attach` — accepts:

- `config.json` + `model.safetensors`: the wrapped LLaVA, float32, weights exactly projector-tiny's;
- `tokenizer.json` / `tokenizer_config.json`: the word-level ShapesVQA tokenizer, plus
  `chat_template.jinja`: `<bos><image> question` for one user turn (image, then text), no
  generation prompt — so the attached model's prompt is `<bos> <image>*N question-words`, the ids
  projector-tiny was trained on;
- `preprocessor_config.json`: a PIL `CLIPImageProcessor` (`CLIPImageProcessorPil`, pinned so that
  torchvision's resize is never used) with a bicubic resize to 64 x 64, no crop, `x / 255`, mean and
  std 0.5: pixels in [-1, 1], bit for bit what the bundled models' own pipeline makes.

Regenerate after retraining projector-tiny::

    python -m cliviz.model.export --model projector-tiny --out assets/models/llava-tiny-base
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cliviz.errors import CLIVizError

# One user turn: the image, then the question; the answer follows directly (no generation prompt).
# A past assistant turn is its answer and <eos>, as in training; any turn's content may be a string or
# a list of typed parts (the form `cliviz train` and llava-hf processors use).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- ' ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image> ' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- ' ' + eos_token + ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
)
DEFAULT_SOURCE = "projector-tiny"
DEFAULT_NAME = "llava-tiny-base"


MODEL_CARD = """# llava-tiny-base

A plain LLaVA folder (`model_type: llava`, `LlavaForConditionalGeneration`) for trying `cliviz attach`
offline: the LLaVA inside the bundled `{source}` model, float32, weights unchanged, written by
`python -m cliviz.model.export --model {source} --out <this folder>` (`cliviz.model.export`).

- `chat_template.jinja`: one user turn renders as `<bos><image> question`; `cliviz` expands the image
  token to one placeholder per patch, so prompts are `<bos> <image>*N question-words`, as in training.
- `preprocessor_config.json`: PIL `CLIPImageProcessor`, bicubic resize to {size} x {size}, no crop,
  x / 255, mean = std = 0.5: pixels in [-1, 1], bit for bit the bundled models' own pipeline.

```bash
cliviz attach --base assets/models/llava-tiny-base --out /tmp/llava-tiny-cli
cliviz trace assets/examples/color.png "what color is the triangle ?" --model /tmp/llava-tiny-cli
```

The attached model answers exactly like `{source}` (its injection starts switched off: alpha = 0).
It knows only synthetic ShapesVQA scenes and the ShapesVQA vocabulary (`cliviz vocab`).
Regenerate this folder whenever `{source}` is retrained.
"""


def image_processor_config(size: int) -> dict:
    """The preprocessor config whose pixels equal `processing.pixel_values` for the bundled models."""
    return {
        "image_processor_type": "CLIPImageProcessorPil",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": False,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def export_llava_base(model: str | Path = DEFAULT_SOURCE, out: str | Path | None = None) -> Path:
    """Save the LLaVA inside a bundled `projector` model (a name or a folder) as a plain llava folder.

    Refuses models with injection (`cli`, `shallow`, `deepstack`): their LLaVA alone is not the model
    that was trained. Returns the folder. Example::

        import tempfile
        from cliviz import export_llava_base
        folder = export_llava_base("projector-tiny", tempfile.mkdtemp())
        assert (folder / "preprocessor_config.json").is_file() and (folder / "chat_template.jinja").is_file()
    """
    from cliviz.model.loading import bundled_models_dir, load_model

    net, tokenizer = load_model(model, device="cpu", dtype="float32")
    if net.config.fusion != "projector":
        raise CLIVizError(f"{model} has fusion {net.config.fusion!r}: only a projector model is a plain LLaVA")
    target = Path(out) if out is not None else bundled_models_dir() / DEFAULT_NAME
    target.mkdir(parents=True, exist_ok=True)
    net.base.save_pretrained(target, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
    size = int(net.config.base_config.vision_config.image_size)
    (target / "preprocessor_config.json").write_text(
        json.dumps(image_processor_config(size), indent=2) + "\n", encoding="utf-8"
    )
    source = Path(str(net.name_or_path))
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", target / "generation_config.json")
    (target / "README.md").write_text(MODEL_CARD.format(source=source.name, size=size), encoding="utf-8")
    for path in target.iterdir():  # safetensors writes 0600 files: the bundled folder must be readable by all
        path.chmod(0o644)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cliviz.model.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_SOURCE, help="bundled projector model name or folder")
    parser.add_argument("--out", default=None, help=f"output folder (default: assets/models/{DEFAULT_NAME})")
    args = parser.parse_args(argv)
    try:
        folder = export_llava_base(args.model, args.out)
    except CLIVizError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote a plain LLaVA folder to {folder}")


if __name__ == "__main__":
    main()
