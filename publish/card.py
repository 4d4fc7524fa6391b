"""The model card (README.md with YAML metadata) of a published Tiny Audio checkpoint.

Metadata is built and checked with huggingface_hub's card tools (`ModelCardData`, `EvalResult`, `ModelCard`),
so what the Hub reads (pipeline tag, base models, model-index with WER, widget) is what the tests check.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from offline_kit.whisper_ct2 import ENGLISH_ONLY_VOCAB_SIZE
from training.evaluation import DATASETS

TEMPLATE_PATH = Path(__file__).with_name("modelcard_template.md")
PIPELINE_TAG = "automatic-speech-recognition"
RESULT_KEYS = ("dataset", "split", "wer")
LICENSE = "mit"  # the project's license (LICENSE, setup.cfg): the card's default
# The Hub sets eval.py streams, as (repo id, configuration); every other evaluated set was a local folder or file.
HUB_EVAL_SETS = {(spec.path, spec.config) for spec in DATASETS.values()}


@dataclass(frozen=True)
class WerResult:
    """One eval.py results.json: WER as a fraction (jiwer's unit) on `samples` clips of a dataset split."""

    dataset: str
    split: str
    wer: float
    dataset_id: str | None = None  # the Hub dataset id, when the set was not a local folder
    config: str | None = None  # the Hub dataset's configuration (load_dataset's name)
    samples: int | None = None
    rtfx: float | None = None
    model: str | None = None  # eval.py's --model-name
    generate_kwargs: dict | None = None  # eval.py's --generate-kwargs ({} = the pipeline's own defaults)
    device: str | None = None  # where RTFx was measured (eval.py's --device, or `hardware` when recorded)
    batch_size: int | None = None

    @property
    def rtfx_setup(self) -> str:
        """What an RTFx figure depends on besides the model: the device and the batch size."""
        parts = [self.device, None if self.batch_size is None else f"batch {self.batch_size}"]
        return ", ".join(part for part in parts if part)


def read_results(paths: list[Path]) -> list[WerResult]:
    """Reads eval.py results files (one JSON object, or a list of them, per file)."""
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"results file {path}: cannot read it as JSON: {err}") from err
        for index, entry in enumerate(data if isinstance(data, list) else [data]):
            missing = [key for key in RESULT_KEYS if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ValueError(f"results file {path}, entry {index}: missing key(s) {missing}")
            hub_set = hub_eval_set(entry.get("dataset_location") or "")
            results.append(
                WerResult(
                    dataset=str(entry["dataset"]),
                    split=str(entry["split"]),
                    wer=float(entry["wer"]),
                    dataset_id=hub_set[0] if hub_set else None,
                    config=hub_set[1] if hub_set else None,
                    samples=entry.get("n"),
                    rtfx=entry.get("rtfx"),
                    model=entry.get("model"),
                    generate_kwargs=entry.get("generate_kwargs"),
                    device=entry.get("hardware") or entry.get("device"),
                    batch_size=entry.get("batch_size"),
                )
            )
    return results


def hub_eval_set(location: str) -> tuple[str, str | None] | None:
    """(repo id, configuration) when eval.py's `dataset_location` is one of the Hub sets it streams, else None.

    eval.py writes "owner/name (config)" for those and a path for a local set. A relative path such as
    "data/real_speech" looks like a repo id, so only the sets eval.py can stream count, wherever this runs.
    """
    parsed = re.fullmatch(r"(?P<id>\S+?)(?: \((?P<config>[^)]+)\))?", location)
    if parsed is None or (parsed["id"], parsed["config"]) not in HUB_EVAL_SETS:
        return None
    return parsed["id"], parsed["config"]


def spoken_languages(config: dict) -> list[str]:
    """Languages the model can transcribe, when its encoder says so: English-only Whisper (the .en models)."""
    audio = config.get("audio_config") or {}
    if audio.get("model_type") == "whisper" and audio.get("vocab_size") == ENGLISH_ONLY_VOCAB_SIZE:
        return ["en"]
    return []


def is_hub_id(repo_id: str) -> bool:
    """True when `repo_id` names a Hub repo rather than a folder on this machine."""
    if Path(repo_id).expanduser().exists() or repo_id.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def build_card(
    *,
    repo_id: str,
    config: dict,
    results: list[WerResult],
    decoding: dict | None = None,
    example_file: str,
    license: str,
    datasets: list[str],
    language: list[str],
    training_data: list[str] = (),
    training_data_note: str | None = None,
    trainable_params: int,
    standalone: bool,
    weights_size: str,
    training_facts: list[tuple[str, str]],
    train_config: str | None,
    baseline: list[WerResult] = (),
) -> ModelCard:
    """Renders the card: metadata from the config and eval results, body from the Markdown template.

    `baseline` holds reference models' results on the same sets (e.g. the encoder's own decoder, with beam search
    and greedy), one column per model in the results table; only this model's results go into the metadata.
    `datasets` are Hub ids for the metadata; `training_data` names every training set, local ones included, for
    the text, and `training_data_note` says in words what they hold (local sets mean nothing to a reader). Without
    `language`, the encoder's config decides where it can (see `spoken_languages`). `decoding` is how the model
    decodes by default (`num_beams`, `ctc_decoding_weight`; greedy alone without it).
    """
    encoder, llm = config["audio_model_id"], config["text_model_id"]
    language = list(language) or spoken_languages(config)
    decoding = decoding or {}
    model_name = repo_id.split("/")[-1]
    eval_results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name="Automatic Speech Recognition",
            dataset_type=result.dataset_id or result.dataset,
            dataset_name=result.dataset,
            dataset_config=result.config,
            dataset_split=result.split,
            metric_type="wer",
            metric_name="WER",
            metric_value=round(100 * result.wer, 2),
        )
        for result in results
    ]
    card_data = ModelCardData(
        pipeline_tag=PIPELINE_TAG,
        library_name="transformers",
        base_model=[model_id for model_id in (encoder, llm) if is_hub_id(model_id)] or None,
        datasets=datasets or None,  # training data; evaluation sets are named in model-index
        language=language or None,
        license=license,
        tags=["tiny-audio", "speech", "asr", "custom_code"],
        model_name=model_name,
        eval_results=eval_results or None,
        widget=[
            {
                "src": f"https://huggingface.co/{repo_id}/resolve/main/{example_file}",
                "example_title": "Example",
            }
        ],
    )
    reference = {(result.model or "baseline", result.dataset, result.split): result for result in baseline}
    baselines = {result.model or "baseline": result.generate_kwargs for result in baseline}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        repo_id=repo_id,
        encoder=encoder,
        llm=llm,
        lora_rank=config.get("lora_rank", 0),
        voice_attributes=[entry["attribute"] for entry in config.get("voice_attributes") or []],
        voice_layer_mix=config.get("voice_layer_mix", False),
        voice_prompt_length=config.get("voice_prompt_length", 0),
        voice_lora_rank=config.get("voice_lora_rank", 0),
        ctc_decoding_weight=decoding.get("ctc_decoding_weight", 0.0),
        num_beams=decoding.get("num_beams", 1),
        projector_downsample=config.get("projector_downsample"),
        projector_activation=config.get("projector_activation"),
        trainable_params=f"{trainable_params:,}",
        standalone=standalone,
        weights_size=weights_size,
        results=[
            {
                "dataset": (result.dataset_id or result.dataset)
                + (f" ({result.config})" if result.config else ""),
                "split": result.split,
                "samples": "" if result.samples is None else result.samples,
                "wer": _wer(result),
                "rtfx": _rtfx(result),
                "rtfx_setup": result.rtfx_setup,
                "baseline_wer": [
                    _wer(reference.get((name, result.dataset, result.split))) for name in baselines
                ],
                "baseline_rtfx": [
                    _rtfx(reference.get((name, result.dataset, result.split)), result.rtfx_setup)
                    for name in baselines
                ],
            }
            for result in results
        ],
        baselines=[
            {"name": name, "decoding": f"`{json.dumps(kwargs)}`" if kwargs else "the pipeline's own defaults"}
            for name, kwargs in baselines.items()
        ],
        training_facts=training_facts,
        train_config=train_config.strip() if train_config else None,
        training_data=list(training_data) or list(datasets),
        training_data_note=training_data_note,
    )


def _wer(result: WerResult | None) -> str:
    return "" if result is None else f"{100 * result.wer:.2f}"


def _rtfx(result: WerResult | None, shared_setup: str | None = None) -> str:
    """RTFx to one decimal; a baseline measured with another device or batch size than ours says so."""
    if result is None or result.rtfx is None:
        return ""
    differs = shared_setup is not None and result.rtfx_setup != shared_setup
    return f"{result.rtfx:.1f}" + (f" ({result.rtfx_setup})" if differs and result.rtfx_setup else "")


def validate_card(path: Path) -> ModelCard:
    """Parses README.md strictly and checks the fields the Hub needs to list and serve this model.

    (`ModelCard.validate` asks the Hub's server; this is the offline part of that check.)
    """
    card = ModelCard.load(path, ignore_metadata_errors=False)
    data = card.data
    problems = []
    if data.pipeline_tag != PIPELINE_TAG:
        problems.append(f"pipeline_tag is {data.pipeline_tag!r}, expected {PIPELINE_TAG!r}")
    if data.library_name != "transformers":
        problems.append(f"library_name is {data.library_name!r}, expected 'transformers'")
    if not data.license:
        problems.append("license is missing")
    base_model = data.base_model or []
    for model_id in [base_model] if isinstance(base_model, str) else base_model:
        if not is_hub_id(model_id):
            problems.append(f"base_model entry {model_id!r} is not a Hub model id")
    widget = data.get("widget") or []
    if not widget or not all(isinstance(item, dict) and item.get("src") for item in widget):
        problems.append("widget needs at least one entry with an audio 'src'")
    for result in data.eval_results or []:
        if result.metric_type == "wer" and not isinstance(result.metric_value, (int, float)):
            problems.append(f"WER on {result.dataset_name} is not a number: {result.metric_value!r}")
    if problems:
        raise ValueError(f"model card {path} is not valid: " + "; ".join(problems))
    return card
