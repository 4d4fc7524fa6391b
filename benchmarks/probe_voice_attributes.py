"""Which attributes of a voice each stage keeps: a linear probe on the clip-mean of the encoder's frames and of the
projected frames, trained on a corpus's training voices and scored on its held-out voices (issue 30).

A model can only describe what reaches the LLM. If a linear probe reads a speaker's gender from the encoder's frames
but not from the projector's, the projector drops it, and no amount of describe training through a frozen LLM
brings it back cheaply. The models given must share one encoder, which runs once; each is probed on the same
clips. Clips whose encoder outputs are in a feature cache (train.py's `feature_cache_dir`) are read from it.

A model with voice-attribute heads (`--voice_attributes` in train.py) gets a column of its own heads' accuracy on the
same held-out clips: what its voice tokens tell the LLM.

`--encoder-layers` adds a column per encoder layer, the probe on the mean and spread of that layer's frames: which
layer the heads would best read each attribute from.

A second table says whether the LLM looks at the audio at all while it answers: the share of its attention (mean
over layers, heads and answer positions, teacher-forced on the corpus's own answers) that falls on audio tokens,
when it transcribes and when it describes.

    python -m benchmarks.probe_voice_attributes MODEL [MODEL ...] [--dataset data/multitask3k] \
      [--feature-cache-dir cache/features] [--max-train-clips 3000] [--encoder-layers]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch

from modeling_tiny_audio import TinyAudioForConditionalGeneration
from offline_kit.descriptions import ATTRIBUTES, clip_facts
from pipeline_asr import read_audio
from processing_tiny_audio import IGNORE_INDEX, TinyAudioProcessor
from training.data import audio_hash
from training.feature_cache import LAYER_STATISTICS, FeatureStore, encoder_key

BATCH = 16


def clip_batches(rows: datasets.Dataset, sampling_rate: int) -> Iterator[list]:
    """The clips of `rows`, read at `sampling_rate`, `BATCH` at a time."""
    for first in range(0, len(rows), BATCH):
        yield [
            read_audio(row["audio"], sampling_rate)
            for row in rows.select(range(first, min(first + BATCH, len(rows))))
        ]


@torch.no_grad()
def encoder_frames(
    model: TinyAudioForConditionalGeneration,
    processor: TinyAudioProcessor,
    rows: datasets.Dataset,
    store: FeatureStore | None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(frames, mask of real frames, every layer's frame statistics) per batch of `BATCH` clips: from the feature
    cache when it holds the whole batch, else from the encoder."""
    batches = []
    for clips in clip_batches(rows, processor.sampling_rate):
        hashes = [audio_hash(clip) for clip in clips]
        if store is not None and all(h in store and h + LAYER_STATISTICS in store for h in hashes):
            frames = [store.get(h) for h in hashes]
            hidden = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
            mask = torch.nn.utils.rnn.pad_sequence(
                [torch.ones(len(f), dtype=torch.bool) for f in frames], batch_first=True
            )
            statistics = torch.stack([store.get_layer_statistics(h) for h in hashes])
        else:
            features = processor.extract_features(clips)
            hidden, mask, statistics = model.encode_audio(
                features["input_features"], features["input_features_mask"], output_layer_statistics=True
            )
        # fp16, as the cache holds them: the train split stays in memory
        batches.append((hidden.half(), mask, statistics.half()))
    return batches


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, dim]: the mean of each row's real positions of [batch, positions, dim]."""
    weights = mask[..., None].float()
    return (values.float() * weights).sum(1) / weights.sum(1)


@torch.no_grad()
def projected_means(
    model: TinyAudioForConditionalGeneration, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """[clips, LLM width]: the mean of each clip's projected frames."""
    means = []
    for hidden, mask, _ in batches:
        projected, token_mask = model.project_audio(hidden.float(), mask)
        means.append(masked_mean(projected, token_mask))
    return torch.cat(means)


@torch.no_grad()
def head_answers(
    model: TinyAudioForConditionalGeneration, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> dict[str, list[str]]:
    """{attribute: the value the model's voice-attribute head gives each clip}; empty without heads."""
    if not model.config.voice_attributes:
        return {}
    logits = torch.cat(
        [model.voice_attribute_logits(hidden.float(), mask, stats.float()) for hidden, mask, stats in batches]
    )
    counts = model.config.voice_attribute_value_counts
    return {
        entry["attribute"]: [entry["values"][index] for index in part.argmax(-1).tolist()]
        for entry, part in zip(model.config.voice_attributes, logits.split(counts, dim=-1), strict=True)
    }


def probe_accuracy(
    train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str]
) -> float:
    """Held-out accuracy of a multinomial logistic regression (L2-regularised, on standardised inputs)."""
    classes = sorted(set(train_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    inputs = (train_x - mean) / std
    targets = torch.tensor([classes.index(value) for value in train_y])
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(inputs.shape[1], len(classes))
    torch.nn.init.normal_(linear.weight, std=0.01, generator=generator)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(linear(inputs), targets) + 1e-2 * linear.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        predicted = linear((test_x - mean) / std).argmax(-1).tolist()
    return sum(classes[p] == y for p, y in zip(predicted, test_y, strict=True)) / len(test_y)


@torch.no_grad()
def attention_on_audio(
    model: TinyAudioForConditionalGeneration, processor: TinyAudioProcessor, rows: list[dict]
) -> float:
    """The share of the LLM's attention from answer positions that falls on audio tokens, teacher-forced on `rows`
    (audio, text, task), averaged over layers, heads and positions."""
    from training.collator import SpeechCollator

    implementation = model.language_model.config._attn_implementation
    model.language_model.set_attn_implementation("eager")  # only eager attention returns its weights
    try:
        batch = SpeechCollator(processor)(rows)
        attentions = model(**batch, output_attentions=True).attentions
    finally:
        model.language_model.set_attn_implementation(implementation)
    on_audio = (batch["input_ids"] == model.config.audio_token_id)[:, None, None, :].float()
    answer = batch["labels"] != IGNORE_INDEX
    shares = [(layer * on_audio).sum(-1).mean(1)[answer].mean() for layer in attentions]
    return float(torch.stack(shares).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="Tiny Audio checkpoints sharing one encoder")
    parser.add_argument("--dataset", default="data/multitask3k", help="a corpus with train and test splits")
    parser.add_argument("--feature-cache-dir", default="cache/features")
    parser.add_argument("--max-train-clips", type=int, default=3000)
    parser.add_argument(
        "--attention-clips", type=int, default=16, help="training clips for the attention table"
    )
    parser.add_argument(
        "--encoder-layers",
        action="store_true",
        help="add a column per encoder layer: the probe on the mean and spread of its frames (what the heads "
        "read)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpus = datasets.load_from_disk(args.dataset).cast_column("audio", datasets.Audio(decode=False))
    train = corpus["train"].select(range(min(args.max_train_clips, len(corpus["train"]))))
    splits = {"train": train, "test": corpus["test"]}
    facts = {name: [clip_facts(row) for row in rows.remove_columns("audio")] for name, rows in splits.items()}
    features: dict[str, dict[str, torch.Tensor]] = {}
    attention: dict[str, dict[str, float]] = {}
    heads: dict[str, dict[str, list[str]]] = {}
    sample = corpus["train"].select(range(min(args.attention_clips, len(corpus["train"]))))
    frames, encoder = {}, None
    for path in args.models:
        model = TinyAudioForConditionalGeneration.from_pretrained(os.path.expanduser(path)).eval()
        processor = TinyAudioProcessor.from_pretrained(os.path.expanduser(path))
        key = encoder_key(model, processor)
        if encoder is None:  # the encoder runs (or the cache is read) once: every model shares it
            cache = Path(args.feature_cache_dir)
            store = FeatureStore(str(cache), key) if cache.is_dir() else None
            frames = {name: encoder_frames(model, processor, rows, store) for name, rows in splits.items()}
            features["encoder"] = {
                name: torch.cat([masked_mean(hidden, mask) for hidden, mask, _ in batches])
                for name, batches in frames.items()
            }
            encoder = key
            if args.encoder_layers:
                per_layer = {
                    name: torch.cat([stats.float() for *_, stats in batches])
                    for name, batches in frames.items()
                }
                for layer in range(per_layer["train"].shape[1]):
                    features[f"encoder layer {layer}, mean+spread"] = {
                        name: values[:, layer] for name, values in per_layer.items()
                    }
        elif key != encoder:
            raise SystemExit(f"{path} has another encoder than {args.models[0]}: probe them apart")
        features[f"projector of {Path(path).name}"] = {
            name: projected_means(model, batches) for name, batches in frames.items()
        }
        answers = head_answers(model, frames["test"])
        if answers:
            heads[f"heads of {Path(path).name}"] = answers
        if len(sample):  # --attention-clips 0: no attention table
            attention[Path(path).name] = {
                task: attention_on_audio(
                    model,
                    processor,
                    [{"audio": row["audio"], "text": row[column], "task": task} for row in sample],
                )
                for task, column in (("transcribe", "text"), ("describe", "description"))
            }

    columns = [*features, *heads]
    print(f"{'attribute':<10}{'held-out clips':>16}{'majority':>10}" + "".join(f"{k:>40}" for k in columns))
    for attribute in ATTRIBUTES:
        labels = {name: [f.get(attribute) for f in split_facts] for name, split_facts in facts.items()}
        keep = {name: [i for i, value in enumerate(values) if value] for name, values in labels.items()}
        train_y = [labels["train"][i] for i in keep["train"]]
        test_y = [labels["test"][i] for i in keep["test"]]
        if len(set(train_y)) < 2 or not test_y:
            continue
        majority = max(test_y.count(value) for value in set(test_y)) / len(test_y)
        line = f"{attribute:<10}{len(test_y):>16}{100 * majority:>9.1f}%"
        for stage in features.values():
            accuracy = probe_accuracy(
                stage["train"][keep["train"]], train_y, stage["test"][keep["test"]], test_y
            )
            line += f"{100 * accuracy:>39.1f}%"
        for answers in heads.values():
            said = answers.get(attribute)
            accuracy = (
                None
                if said is None
                else sum(said[i] == labels["test"][i] for i in keep["test"]) / len(test_y)
            )
            line += f"{'-':>40}" if accuracy is None else f"{100 * accuracy:>39.1f}%"
        print(line, flush=True)
    if not attention:
        return
    print(f"\nShare of the LLM's attention on audio tokens while answering ({len(sample)} training clips):")
    print(f"{'model':<32}{'transcribing':>14}{'describing':>12}")
    for name, shares in attention.items():
        print(f"{name:<32}{100 * shares['transcribe']:>13.1f}%{100 * shares['describe']:>11.1f}%")


if __name__ == "__main__":
    main()
