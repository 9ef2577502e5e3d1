"""The tiny llava-hf-style checkpoint builders, kept under their old module name: they live in
`factories` (the one home of the tests' builders)."""

from factories import (  # noqa: F401
    CORPUS,
    LLAVA15_TEMPLATE,
    ONEVISION_TEMPLATE,
    PATCH,
    PINPOINTS,
    SIZE,
    build_tokenizer,
    llava15_base,
    llava15_folder,
    llava15_image_processor,
    llava15_processor,
    llava15_tokenizer,
    onevision_base,
    onevision_folder,
    onevision_image_processor,
    onevision_processor,
    onevision_tokenizer,
)
