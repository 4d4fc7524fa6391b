"""Word error rate and speed of an ASR model, measured the way the Open ASR Leaderboard measures them.

    python eval.py MODEL --dataset librispeech-clean ami --max-samples 100

The command: argument parsing over ``training.evaluation``, which does the work.

MODEL is a Tiny Audio checkpoint (folder or Hub id) or any transformers ASR model (e.g. a Whisper checkpoint):
both are loaded through the standard ``transformers.pipeline("automatic-speech-recognition", ...)``; Tiny Audio
checkpoints bring their own pipeline class through ``trust_remote_code``. References and predictions are normalised
with Whisper's English normaliser and scored with jiwer (corpus WER = total errors / total reference words).
RTFx is audio seconds divided by the wall seconds of the pipeline calls (feature extraction + generation +
decoding), warm-up excluded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from offline_kit.descriptions import has_facts
from serving.loading import Int8Unsupported, load_asr_pipeline
from serving.options import add_int8_option
from training.evaluation import (
    DATASETS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_OUTPUT_DIR,
    DESCRIBE,
    SCORED_TASKS,
    TASK_SUFFIX,
    TRANSCRIBE,
    NoScoredClips,
    RunSettings,
    baseline_samples,
    check_output_dir,
    compare_runs,
    evaluate,
    format_attribute_table,
    format_comparison,
    format_table,
    git_hash,
    git_user,
    read_finished,
    resolve_dataset,
    run_key,
    slug,
)
from training.preflight import PreflightError, check_model_source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", help="Tiny Audio checkpoint or transformers ASR model: local folder or Hub id"
    )
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=["loquacious"],
        help=f"'all', registry names ({', '.join(DATASETS)}) or local dataset paths",
    )
    parser.add_argument("--split", help="override the split (registry default, else 'test' for save_to_disk)")
    parser.add_argument("--max-samples", type=int, help="evaluate this many clips, chosen with seed 42")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"clips per generate call (default {DEFAULT_BATCH_SIZE}); stated beside every RTFx",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:1, mps ... (default: the pipeline's choice, an accelerator when there is one)",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    add_int8_option(parser)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run in --output-dir (only once the new run has completed)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=100, help="print corpus WER every N samples")
    parser.add_argument("--audio-column", help="audio column of a local dataset (auto-detected by default)")
    parser.add_argument(
        "--text-column", help="transcript column of a local dataset (auto-detected by default)"
    )
    parser.add_argument(
        "--generate-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"language": "en"}\''
    )
    parser.add_argument(
        "--chunk-length-s",
        type=float,
        help="pipeline chunking for long clips (stock Whisper needs 30 for clips over 30 s)",
    )
    parser.add_argument(
        "--model-name",
        help="name in results, output folder and leaderboard (default: MODEL, or a local folder's own name)",
    )
    parser.add_argument("--contributor", help="name on the leaderboard (default: git config user.name)")
    parser.add_argument(
        "--task",
        default=TRANSCRIBE,
        help="transcribe (scored by WER), or describe (Tiny Audio models; scored per attribute on the offline "
        "kit's corpora, whose rows record what each clip sounds like)",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        help="an earlier run's --output-dir: pairs the clips and prints the WER change with a bootstrap 95%% "
        "interval (also saved as comparison.json)",
    )
    return parser


def default_model_name(model: str) -> str:
    """A Hub id names itself; a local checkpoint is named by its folder, not by the path to it."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def main(argv: list[str] | None = None) -> int:
    """Console entry point `tiny-audio-eval`. Everything a user can get wrong is checked before the model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = list(DATASETS) if args.dataset == ["all"] else args.dataset
    if (
        args.batch_size < 1
        or args.checkpoint_every < 1
        or (args.max_samples is not None and args.max_samples < 1)
    ):
        parser.error("--batch-size, --checkpoint-every and --max-samples must be positive")
    if args.chunk_length_s is not None and args.chunk_length_s <= 0:
        parser.error("--chunk-length-s must be positive")
    if not isinstance(args.generate_kwargs, dict):
        parser.error("--generate-kwargs must be a JSON object, e.g. '{\"num_beams\": 1}'")
    if args.task not in SCORED_TASKS:
        parser.error(f"--task {args.task!r}: eval.py scores the tasks {', '.join(SCORED_TASKS)}")
    if args.task != TRANSCRIBE and args.compare_with:
        parser.error("--compare-with pairs WERs: use it with --task transcribe")
    model_name = args.model_name or default_model_name(args.model)
    settings = RunSettings(
        model=args.model,
        model_name=model_name,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        device=args.device or "",  # the pipeline's choice, filled in once it has loaded
        dtype=args.dtype,
        int8=args.int8,
        checkpoint_every=args.checkpoint_every,
        generate_kwargs=args.generate_kwargs,
        chunk_length_s=args.chunk_length_s,
        contributor=args.contributor or git_user(),
        git_hash=git_hash(),
        task=args.task,
    )
    planned = []
    try:
        sources = [resolve_dataset(name, args.split, args.audio_column, args.text_column) for name in names]
        for source in sources:
            if args.task == DESCRIBE and not has_facts(list(source.rows.column_names or [])):
                raise PreflightError(
                    f"{source.name} does not say what its clips sound like (no facts column, nor the voice, "
                    "family and speaker columns of the offline kit's corpora), so descriptions cannot be scored"
                )
        check_model_source(args.model)
        for source in sources:
            out_dir = (
                args.output_dir / slug(model_name) / (slug(source.name) + TASK_SUFFIX.get(args.task, ""))
            )
            check_output_dir(out_dir, args.resume, args.overwrite, run_key(settings, source))
            baseline = args.compare_with and baseline_samples(args.compare_with, slug(source.name))
            # Read now: with --overwrite the baseline may be the very run this one replaces.
            planned.append((source, out_dir, baseline, baseline and read_finished(baseline)))
    except ValueError as error:  # PreflightError, and load_source's column and split errors
        parser.error(str(error))

    print(f"Loading model {args.model}" + (f" on {args.device}" if args.device else ""))
    try:
        pipe = load_asr_pipeline(args.model, args.device, args.dtype, int8=args.int8)
    except Int8Unsupported as error:
        parser.error(str(error))
    tasks = getattr(getattr(pipe, "processor", None), "task_prompts", {TRANSCRIBE: None})
    if args.task not in tasks:
        parser.error(f"--task {args.task!r}: this model's tasks are {', '.join(sorted(tasks))}")
    if not settings.device:
        settings = replace(settings, device=pipe.device.type)  # "cuda", "cpu": as results name it
    all_results = []
    comparisons = []
    for source, out_dir, baseline, baseline_rows in planned:
        try:
            all_results.append(evaluate(pipe, source, settings, out_dir, args.resume, args.overwrite))
        except NoScoredClips as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        if baseline:
            comparison = compare_runs(baseline_rows, read_finished(out_dir / "samples.jsonl"))
            (out_dir / "comparison.json").write_text(
                json.dumps({"baseline": str(baseline), **comparison}, indent=2) + "\n"
            )
            comparisons.append(format_comparison(comparison, baseline.parent))
    print(format_attribute_table(all_results) if args.task == DESCRIBE else format_table(all_results))
    for line in comparisons:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
