"""Recording overhead: `trace_batch` (every gate + injection norm saved through nnsight, per step)
versus a plain `model.generate` on the same inputs with the same generation kwargs.

Variants, interleaved A B C A B C ... after a warm-up, medians reported (never one-off times):
  plain   `prepare_inputs` + `model.generate(**inputs, **generation_kwargs(tok, N))`
  record  `prepare_inputs` + the nnsight traced generate alone (`record._record`)
  trace   `trace_batch(...)`: the traced generate plus building the `Trace` objects

Models: (a) the bundled cli-tiny (`load_model()`; a random model of the same architecture when
assets/models/cli-tiny is absent), (b) a medium random-init CLI model (~90 M parameters: CLIP
512-d x 8 layers, 64 px / patch 8 + Llama 768-d x 8 layers, 12 heads).

Targets: trace / plain <= 1.10x on the bundled model, <= 1.05x on the medium one.

    python benchmarks/bench_trace_overhead.py --repeats 20
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch: idle OpenMP threads must not spin on a shared box
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from common import bundled_model  # noqa: E402  (same folder)

TARGETS = {"bundled": 1.10, "medium": 1.05}


def open_alpha(model, value: float = 0.7):
    """Random models start with injection closed (alpha = 0): open it so the injection path does real work."""
    with torch.no_grad():
        for layer in model.agf:
            layer.injection.alpha.fill_(value)
    return model


def medium_model():
    """A ~90 M-parameter random-init CLI model on the project's tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.model import CLIConfig, CLIForConditionalGeneration

    torch.manual_seed(0)
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, image_size=64, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=768,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    base = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    cfg = CLIConfig(base_config=base, fusion="cli", lora_rank=8, gate_temperature=1.0)
    return open_alpha(CLIForConditionalGeneration(cfg).eval()), tok, "medium random CLI"


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(model, tok, *, batch: int, new_tokens: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved."""
    from cliviz.data import iter_samples
    from cliviz.inference import generation_kwargs, prepare_inputs
    from cliviz.tracing.record import _record, trace_batch

    samples = list(iter_samples(batch, seed=7))
    images, questions = [s.image for s in samples], [s.question for s in samples]
    kwargs = generation_kwargs(tok, new_tokens)

    @torch.no_grad()
    def plain():
        model.generate(**prepare_inputs(model, tok, images, questions), **kwargs)

    @torch.no_grad()
    def record():
        _record(model, prepare_inputs(model, tok, images, questions), kwargs, new_tokens)

    def trace():
        trace_batch(model, tok, images, questions, max_new_tokens=new_tokens)

    variants = {"plain": plain, "record": record, "trace": trace}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="samples per generate")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--models", default="bundled,medium", help="comma-separated subset of bundled,medium")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    builders = {"bundled": bundled_model, "medium": medium_model}
    rows = []
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, tok, label = builders[key]()
        params = n_params(model)
        print(
            f"{key}: {label}, {params / 1e6:.1f} M parameters, {len(model.agf)} gated layers x "
            f"{len(model.config.vision_layers)} vision layers",
            flush=True,
        )
        med = measure(
            model, tok, batch=args.batch, new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup
        )
        rows.append((key, params, med))
        del model

    print(
        f"\nbatch {args.batch}, {args.max_new_tokens} new tokens, {args.repeats} interleaved rounds, "
        f"{torch.get_num_threads()} threads; medians"
    )
    header = (
        f"{'model':<8} {'params':>8} {'plain ms':>9} {'record ms':>10} {'trace ms':>9} "
        f"{'record/plain':>13} {'trace/plain':>12} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    for key, params, med in rows:
        ratio = med["trace"] / med["plain"]
        target = TARGETS[key]
        verdict = "ok" if ratio <= target else "over"
        print(
            f"{key:<8} {params / 1e6:>7.1f}M {med['plain'] * 1e3:>9.1f} {med['record'] * 1e3:>10.1f} "
            f"{med['trace'] * 1e3:>9.1f} {med['record'] / med['plain']:>12.3f}x {ratio:>11.3f}x "
            f"{'<=' + format(target, '.2f'):>7} {verdict}"
        )


if __name__ == "__main__":
    main()
