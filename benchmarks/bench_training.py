"""Training throughput of train.py on the offline preset: live encoder vs feature cache vs the encoder on the
clips' own frames, fp32 vs bf16.

    python -m offline_kit.preset                  # once: Whisper tiny.en + SmolLM2-135M in ~/.cache/tiny_audio/offline
    python -m benchmarks.bench_training [--steps 10] [--warmup 2] [--configs bf16-cache,fp32-live]

Each configuration trains in its own process through `train.run` (the real CLI path, Trainer included) on
batches of 8 clips of ~3.4 s and reports seconds per step, clips/s, audio hours per hour, the one-time cost of
building the feature cache, the process's peak memory, and where a step's seconds go (each tower's forward, the
losses, backward and optimizer, the next batch), and the work of the LLM's linear layers (GFLOP a step) against
this CPU's fp32 matmul rate on one of their products, measured in the same run: how close a step is to its bound.
Without the preset, the same architectures are built
with random weights (same compute, no meaningful loss) and the table says so.
The reference project (alexkroman/tiny-audio) trains side by side with `--reference PATH`, its `tiny_audio`
package folder (README "Benchmarks" says how to get it): the `ref-fp32-live` configuration builds its `ASRModel`
from the same Whisper and LLM and trains it through the same Trainer on the same clips, with batches made as its
training script makes them (`ASRProcessor` prompts, every prompt token masked from the loss; its punctuation model, which only
rewrites the transcripts, is left out). 'vs ref' divides by that run. Without `--reference`, it divides by the
reference's figures from the 2-core Intel Xeon of issue 28 (2.15 s/step in bf16, 4.36 s in fp32), a ratio only on
that kind of machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from benchmarks import reference_project

REFERENCE_SECONDS_PER_STEP = {"bf16": 2.15, "fp32": 4.36}
BATCH = 8
CLIP_SECONDS = (3.2, 3.6)  # ~3.4 s on average, like the reference measurement
WORDS = "the small dog ran across a quiet street while people watched from every window".split()
# live: the encoder runs every step on 30-s windows; cache: its outputs are read from the feature cache; real: it
# runs every step on the clips' own frames (`--encoder_real_length`).
CONFIGS = ("fp32-live", "bf16-live", "fp32-cache", "bf16-cache", "fp32-real")
REFERENCE_CONFIG = "ref-fp32-live"  # the reference project's model, live encoder (it has no feature cache)
PROFILE_PARTS = ("encoder", "projector", "llm", "forward", "step", "between steps")
PRESET = Path(os.environ.get("TINY_AUDIO_CACHE", "~/.cache/tiny_audio/offline")).expanduser()


def make_clips(directory: Path, count: int) -> Path:
    """`count` clips of 3.2-3.6 s (a tone under noise) with 9-word transcripts, saved with save_to_disk."""
    from datasets import Dataset

    rng = np.random.default_rng(0)
    audio, text = [], []
    for _ in range(count):
        samples = int(16000 * rng.uniform(*CLIP_SECONDS))
        time_axis = np.arange(samples) / 16000
        clip = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * time_axis) + 0.05 * rng.standard_normal(
            samples
        )
        buffer = io.BytesIO()
        soundfile.write(buffer, clip.astype(np.float32), 16000, format="WAV")
        audio.append({"bytes": buffer.getvalue(), "path": None})
        text.append(" ".join(rng.choice(WORDS, 9)))
    Dataset.from_dict({"audio": audio, "text": text}).save_to_disk(directory)
    return directory


# The published architectures of the offline preset's models (their config.json), for random stand-ins.
WHISPER_TINY_ARCHITECTURE = {
    "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
    "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
}  # fmt: skip
SMOLLM2_135M_ARCHITECTURE = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
}  # fmt: skip


def random_preset(directory: Path) -> tuple[str, str]:
    """Whisper tiny.en and SmolLM2-135M architectures with random weights, when the offline preset is absent."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    from testing.tiny_models import make_tiny_tokenizer

    whisper = WhisperModel(WhisperConfig(**WHISPER_TINY_ARCHITECTURE))
    whisper.save_pretrained(directory / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory / "whisper")
    tokenizer = make_tiny_tokenizer()
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    llm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_ARCHITECTURE, **ids))
    llm.save_pretrained(directory / "llm")
    tokenizer.save_pretrained(directory / "llm")
    return str(directory / "whisper"), str(directory / "llm")


def step_timer(warmup_steps: int):
    """A Trainer callback that times the steps after `warmup_steps`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Step ends (wall and CPU clocks), and where the measured steps' seconds go: each tower's forward, the rest
        of the forward (the merge and the losses), the rest of the step (backward and optimizer) and the time
        between steps (the next batch)."""

        def __init__(self):
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.train_begin = 0.0
            self.parts: dict[str, float] = dict.fromkeys(PROFILE_PARTS, 0.0)
            self.measuring = False
            self.step_begin = 0.0
            self.llm_positions = 0  # positions the LLM ran over in the measured steps
            self.llm_linear_weights = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.train_begin = time.perf_counter()
            if hasattr(model, "encode_audio"):
                # Ours runs the audio path through methods (Whisper's encoder through `forward_bottom`, not
                # `forward`): they are timed as called.
                for part, method in (("encoder", "encode_audio"), ("projector", "project_audio")):
                    setattr(model, method, self._timed(getattr(model, method), part))
                modules = (("llm", model.language_model), ("forward", model))
            else:  # the reference project's model: towers called as modules
                modules = (
                    ("encoder", model.audio_tower),
                    ("projector", model.projector),
                    ("llm", model.language_model),
                    ("forward", model),
                )
            llm = dict(modules)["llm"]
            head = llm.get_output_embeddings()
            self.llm_linear_weights = sum(
                m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear) and m is not head
            )
            llm.register_forward_pre_hook(self._count_positions, with_kwargs=True)
            for part, module in modules:
                started: list[float] = []
                module.register_forward_pre_hook(
                    lambda *_, started=started: started.append(time.perf_counter())
                )
                module.register_forward_hook(
                    lambda *_, started=started, part=part: self._add(
                        part, time.perf_counter() - started.pop()
                    )
                )

        def _timed(self, method, part: str):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                result = method(*args, **kwargs)
                self._add(part, time.perf_counter() - start)
                return result

            return timed

        def _count_positions(self, module, args, kwargs) -> None:
            if self.measuring:
                embeds = kwargs.get("inputs_embeds")
                self.llm_positions += (
                    embeds.shape[0] * embeds.shape[1] if embeds is not None else args[0].numel()
                )

        def _add(self, part: str, seconds: float) -> None:
            if self.measuring:
                self.parts[part] += seconds

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_begin = time.perf_counter()
            self.measuring = state.global_step >= warmup_steps
            if self.measuring:
                self.parts["between steps"] += self.step_begin - self.wall[-1]

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            if self.measuring:
                self.parts["step"] += self.wall[-1] - self.step_begin

    return Timer()


def run_config(name: str, models: list[str], work: Path, args: argparse.Namespace) -> dict:
    """One configuration in this process: train warmup + steps steps and time the measured ones."""
    timer = step_timer(args.warmup)
    start = time.perf_counter()
    if name == REFERENCE_CONFIG:
        train_reference(models, work, args, timer)
    else:
        import train

        precision, mode = name.split("-")
        argv = (
            f"--audio_model_id {models[0]} --text_model_id {models[1]} --train_datasets {work / 'clips'} "
            f"--output_dir {work / name} --per_device_train_batch_size {BATCH} "
            f"--max_steps {args.steps + args.warmup} --learning_rate 1e-3 --save_strategy no --report_to none "
            f"--logging_steps 1000 --disable_tqdm true --dataloader_num_workers {args.workers} "
            "--train_sampling_strategy group_by_length"
        ).split()
        if precision == "bf16":
            argv.append("--bf16")
        if mode == "cache":
            argv += ["--feature_cache_dir", str(work / "cache")]
        if mode == "real":
            argv += ["--encoder_real_length", "true"]
        train.run(argv, callbacks=[timer])
    measured = slice(max(args.warmup - 1, 0), None)  # differences between step ends after the warm-up steps
    return {
        "config": name,
        "seconds_per_step": float(np.median(np.diff(timer.wall[measured]))),
        "cpu_seconds_per_step": float(np.median(np.diff(timer.cpu[measured]))),
        "prepare_seconds": timer.train_begin - start,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "profile": profile_shares(timer.parts, args.steps),
        "llm_positions_per_step": timer.llm_positions / args.steps,
        "llm_gflop_per_step": llm_gflop(timer.llm_linear_weights, timer.llm_positions / args.steps),
    }


def llm_gflop(linear_weights: int, positions: float) -> float:
    """GFLOP of the LLM's linear layers in one step: 2 per weight and position forward, 2 more backward for the
    gradient of their inputs (the weights are frozen: no weight gradient); attention's own products are left out."""
    return 4 * linear_weights * positions / 1e9


def matmul_gflops(threads: int, seconds: float = 1.5) -> float:
    """This CPU's fp32 rate on one of the LLM's own products (a [512 x 576] x [576 x 1536] matmul, SmolLM2-135M's
    MLP on a step's worth of positions), at the benchmark's thread count: the ceiling of the LLM's share of a step."""
    import torch

    torch.set_num_threads(threads)
    left, right = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(10):
        left @ right
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        left @ right
        count += 1
    return 2 * 512 * 576 * 1536 * count / (time.perf_counter() - start) / 1e9


def train_reference(models: list[str], work: Path, args: argparse.Namespace, timer) -> None:
    """The reference project's model (its projector trains, its towers are frozen) through the Trainer, on the
    clips train.py reads, in batches made as its training script makes them."""
    import datasets
    from transformers import Trainer, TrainingArguments

    from pipeline_asr import read_audio
    from processing_tiny_audio import IGNORE_INDEX

    model, processor = reference_project.build(Path(args.reference), *models)
    pad_id = model.tokenizer.pad_token_id

    def collate(rows: list[dict]) -> dict:
        """Prompt + transcript per clip, the loss on the transcript only, padded on the right: what the reference's
        DataCollator makes (through trl), each clip's audio-token count from its real mel frames."""
        clips = [read_audio(row["audio"], 16000) for row in rows]
        audio = processor.feature_extractor(
            clips, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt"
        )
        sequences, labels = [], []
        for mel_frames, row in zip(audio["attention_mask"].sum(-1).tolist(), rows, strict=True):
            tokens = model.projector.get_output_length(processor._compute_encoder_output_length(mel_frames))
            user = {"role": "user", "content": processor.TRANSCRIBE_PROMPT + processor.AUDIO_TOKEN * tokens}
            prompt = model.tokenizer.apply_chat_template([user], add_generation_prompt=True)["input_ids"]
            full = model.tokenizer.apply_chat_template([user, {"role": "assistant", "content": row["text"]}])[
                "input_ids"
            ]
            sequences.append(torch.tensor(full))
            labels.append(torch.tensor([IGNORE_INDEX] * len(prompt) + full[len(prompt) :]))
        return {
            "input_ids": torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id),
            "attention_mask": torch.nn.utils.rnn.pad_sequence(
                [torch.ones_like(s) for s in sequences], batch_first=True
            ),
            "labels": torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
            "input_features": audio["input_features"],
            "audio_attention_mask": audio["attention_mask"],
        }

    clips = datasets.load_from_disk(str(work / "clips")).cast_column("audio", datasets.Audio(decode=False))
    training_args = TrainingArguments(
        output_dir=str(work / REFERENCE_CONFIG),
        per_device_train_batch_size=BATCH,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
        disable_tqdm=True,
        dataloader_num_workers=args.workers,
        remove_unused_columns=False,
    )
    Trainer(
        model=model, args=training_args, train_dataset=clips, data_collator=collate, callbacks=[timer]
    ).train()


def profile_shares(parts: dict[str, float], steps: int) -> dict[str, float]:
    """Seconds per step of each part of a step, the nested forwards taken out of the ones that hold them."""
    towers = parts["encoder"] + parts["projector"] + parts["llm"]
    return {
        "encoder forward": parts["encoder"] / steps,
        "projector forward": parts["projector"] / steps,
        "LLM forward": parts["llm"] / steps,
        "merge + losses": (parts["forward"] - towers) / steps,
        "backward, optimizer": (parts["step"] - parts["forward"]) / steps,
        "next batch": parts["between steps"] / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default because on a shared 2-core box OpenMP threads spin-wait for each other "
        "(a step can take 5x longer with 2); use 2 on an idle machine",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--reference",
        default=None,
        help="the reference project's tiny_audio package folder: adds the ref-fp32-live configuration",
    )
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one config, run in its own process
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_training_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        result = run_config(args.child, json.loads((work / "models.json").read_text()), work, args)
        print("RESULT " + json.dumps(result))
        return

    whisper, llm = PRESET / "whisper-tiny.en", PRESET / "smollm2-135m-instruct"
    if whisper.is_dir() and llm.is_dir():
        models, source = [str(whisper), str(llm)], f"offline preset ({PRESET})"
    else:
        models = list(random_preset(work / "random"))
        source = (
            "RANDOM weights, preset architectures (offline preset absent: run python -m offline_kit.preset)"
        )
    (work / "models.json").write_text(json.dumps(models))
    make_clips(work / "clips", BATCH * (args.steps + args.warmup))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()[0]
    results = []
    configs = args.configs.split(",")
    if args.reference and REFERENCE_CONFIG not in configs:
        configs.append(REFERENCE_CONFIG)
    for name in configs:
        child = [sys.executable, "-m", "benchmarks.bench_training", "--child", name, "--work-dir", str(work)]
        child += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--workers", str(args.workers)]
        if args.reference:
            child += ["--reference", str(Path(args.reference).resolve())]
        output = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode or not lines:
            sys.exit(f"{name} failed:\n{output.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))

    clip_seconds = sum(CLIP_SECONDS) / 2
    measured_reference = [row for row in results if row["config"] == REFERENCE_CONFIG]
    if measured_reference:
        reference, ratio_name = BATCH / measured_reference[0]["seconds_per_step"], "vs ref fp32"
        reference_note = "'vs ref fp32': clips/s over the reference project's, measured in this run."
    else:
        reference, ratio_name = BATCH / REFERENCE_SECONDS_PER_STEP["bf16"], "vs ref bf16"
        reference_note = (
            f"'vs ref bf16': over the reference project's {REFERENCE_SECONDS_PER_STEP['bf16']} s/step in bf16 "
            f"({REFERENCE_SECONDS_PER_STEP['fp32']} in fp32) on issue 28's Intel Xeon, not measured here "
            "(--reference measures it)."
        )
    print(f"Models: {source}")
    print(
        f"Batches of {BATCH} clips of ~{clip_seconds:.1f} s, {args.steps} measured steps after {args.warmup} warm-up, "
        f"torch threads: {args.threads}, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    header = (
        "config",
        "s/step",
        "CPU s/step",
        "clips/s",
        "audio h/h",
        ratio_name,
        "prepare s",
        "peak RSS GiB",
    )
    print("".join(f"{h:>14}" for h in header))
    for row in results:
        clips = BATCH / row["seconds_per_step"]
        cells = (
            row["config"],
            f"{row['seconds_per_step']:.3f}",
            f"{row['cpu_seconds_per_step']:.3f}",
            f"{clips:.1f}",
            f"{clips * clip_seconds:.1f}",
            f"{clips / reference:.2f}x",
            f"{row['prepare_seconds']:.1f}",
            f"{row['peak_rss_gib']:.2f}",
        )
        print("".join(f"{c:>14}" for c in cells))
    parts = list(results[0]["profile"])
    print(
        "Where a measured step's seconds go (module hooks; 'next batch': between steps, collation included):"
    )
    print(f"{'config':>14}" + "".join(f"{part:>20}" for part in parts))
    for row in results:
        print(f"{row['config']:>14}" + "".join(f"{row['profile'][part]:>20.3f}" for part in parts))
    rate = matmul_gflops(args.threads)
    print(
        "The LLM's linear layers (forward, and backward to their inputs) against this CPU's fp32 matmul rate on one "
        f"of their products at {args.threads} thread(s), {rate:.0f} GFLOP/s:"
    )
    print(
        f"{'config':>14}{'positions/step':>16}{'GFLOP/step':>12}{'LLM fwd+bwd s':>15}{'GFLOP/s':>9}{'of rate':>9}"
    )
    for row in results:
        seconds = row["profile"]["LLM forward"] + row["profile"]["backward, optimizer"]
        achieved = row["llm_gflop_per_step"] / seconds
        print(
            f"{row['config']:>14}{row['llm_positions_per_step']:>16.0f}{row['llm_gflop_per_step']:>12.1f}"
            f"{seconds:>15.3f}{achieved:>9.0f}{achieved / rate:>9.0%}"
        )
    print(
        f"{reference_note} 'prepare s': model load, data checks and, for -cache, encoding every clip once. Wall "
        "times are only comparable on an otherwise idle machine."
    )


if __name__ == "__main__":
    main()
