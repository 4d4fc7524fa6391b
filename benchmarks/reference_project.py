"""The reference project (alexkroman/tiny-audio, its Whisper era at dc8b714), built from the same encoder and LLM as
ours, for the side-by-side benchmarks (issue 28).

Its `tiny_audio` package is imported from the folder given, under the name `reference_tiny_audio`, so that nothing is
installed and our own modules are untouched. Get the folder with:

    git clone https://github.com/alexkroman/tiny-audio /tmp/reference-checkout && mkdir -p /tmp/reference
    git -C /tmp/reference-checkout archive dc8b714 tiny_audio | tar -x -C /tmp/reference
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE_NAME = "reference_tiny_audio"


def import_package(package: Path) -> tuple[object, object]:
    """The reference's `asr_modeling` and `asr_processing` modules, from its `tiny_audio` folder."""
    init = package / "__init__.py"
    if not init.is_file():
        sys.exit(
            f"--reference {package}: no __init__.py there; give the reference project's tiny_audio folder"
        )
    if PACKAGE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE_NAME, init, submodule_search_locations=[str(package)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE_NAME] = module
        spec.loader.exec_module(module)
    return (
        importlib.import_module(f"{PACKAGE_NAME}.asr_modeling"),
        importlib.import_module(f"{PACKAGE_NAME}.asr_processing"),
    )


def build(package: Path, audio_model_id: str, text_model_id: str) -> tuple[object, object]:
    """Its model (fp32, SDPA attention, its default MLP projector, fresh) and processor over our encoder and LLM."""
    modeling, processing = import_package(package)
    config = modeling.ASRConfig(
        audio_model_id=audio_model_id,
        text_model_id=text_model_id,
        attn_implementation="sdpa",
        model_dtype="float32",
    )
    model = modeling.ASRModel(config)
    processor = processing.ASRProcessor(model.feature_extractor, model.tokenizer, projector=model.projector)
    return model, processor
