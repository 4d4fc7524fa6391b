"""Would drafting from the CTC head make greedy decoding faster on this CPU? (issue 28, "drafted decoding")

The CTC head proposes a transcript for every clip: the best path of its frame scores, repeats merged and blanks
dropped. Speculative decoding would feed k of its tokens after the current one, let the LLM score all k + 1
positions in one forward pass and keep the draft up to its first disagreement with the LLM's own (joint CTC)
choice, plus that choice. It pays when the forwards it saves outweigh what each wider forward costs. This script
measures both sides on real clips, with the model's own greedy decoding as the transcript to reproduce:

- agreement: the share of the greedy tokens that the draft holds, in order (difflib's matching blocks);
- forwards: how many decoding forwards drafts of k tokens would need, against one per token without. It is an
  upper bound on what any way of taking k-token drafts from the CTC transcript can save: each forward takes the
  draft window, anywhere in the transcript, that the LLM accepts longest, and every clip advances alone (in a batch
  a forward would wait for its slowest row);
- cost: the measured time of one decoding forward that feeds k + 1 tokens per row against one, at batch 1 and 16,
  with a cache as long as a prompt;
- the best speed-up the decoding steps could get: the forward saving divided by the cost of the wider forward.
  Below 1, drafting slows decoding down.

    python -m benchmarks.bench_ctc_draft [--model DIR] [--dataset data/real_speech] [--clips 32] [--threads 2]

The model must have a CTC head (`--ctc_weight` in training); by default the offline preset
(`python -m offline_kit.preset`) on the real-speech set (`python -m offline_kit.real_speech`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from decoding_tiny_audio import NO_CTC_HEAD, embedding_ctc_logits
from pipeline_asr import read_audio
from training.evaluation import load_source, select

OFFLINE_PRESET = Path("~/.cache/tiny_audio/offline/tiny-audio-offline").expanduser()
DRAFT_LENGTHS = (1, 2, 4, 8)
BATCH_SIZES = (1, 16)
PROMPT_TOKENS = 70  # a 3-s clip's prompt: the chat template and 38 audio tokens


def ctc_best_path(model, inputs) -> list[int]:
    """The CTC head's transcript of one clip: each frame's likeliest token, repeats merged, blanks dropped."""
    audio, audio_mask = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    embeddings = model.get_input_embeddings().weight
    logits = embedding_ctc_logits(audio[0][audio_mask[0]], embeddings, embeddings.float().pow(2).sum(-1))
    path = logits.argmax(-1).tolist()
    blank = model.config.ctc_blank_token_id
    return [token for i, token in enumerate(path) if token != blank and (i == 0 or token != path[i - 1])]


def oracle_forwards(greedy: list[int], draft: list[int], draft_length: int) -> int:
    """Decoding forwards with drafts of `draft_length` tokens, each the window of `draft` the LLM accepts longest."""
    forwards = position = 0
    while position < len(greedy):
        rest = greedy[position:]
        accepted = 0
        for start in range(len(draft)):
            window = draft[start : start + draft_length]
            run = 0
            while run < len(window) and run < len(rest) and window[run] == rest[run]:
                run += 1
            accepted = max(accepted, run)
        forwards += 1
        position += accepted + 1  # the kept draft tokens, then the LLM's own next token
    return forwards


def forward_seconds(language_model, batch: int, new_tokens: int, repeats: int = 7) -> float:
    """Median time of one decoding forward feeding `new_tokens` tokens per row after a prompt-long cache."""
    prompt = torch.randint(100, 1000, (batch, PROMPT_TOKENS))
    prefilled = language_model(input_ids=prompt, use_cache=True).cache
    times = []
    for _ in range(repeats):
        cache = copy.deepcopy(prefilled)
        tokens = torch.randint(100, 1000, (batch, new_tokens))
        start = time.perf_counter()
        language_model(input_ids=tokens, cache=cache, use_cache=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(OFFLINE_PRESET))
    parser.add_argument("--dataset", default="data/real_speech")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    if model.config.ctc_blank_token_id is None:
        raise SystemExit(f"{args.model}: {NO_CTC_HEAD}")
    model.merge_lora()
    source = load_source(args.dataset)
    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )

    greedy_tokens = matched = 0
    forwards = dict.fromkeys(DRAFT_LENGTHS, 0)
    clips = list(select(source.rows, args.clips))
    for row in clips:
        audio = read_audio(row[source.audio_column], processor.sampling_rate)
        inputs = processor(audio=audio, task="transcribe")
        prompt_length = inputs["input_ids"].shape[1]
        generated = model.generate(**inputs, num_beams=1)[0, prompt_length:].tolist()
        spoken = [token for token in generated if token not in eos]
        greedy = spoken + [next(iter(eos))]  # the transcript, then the EOS that ends it
        draft = ctc_best_path(model, inputs) + [next(iter(eos))]
        blocks = difflib.SequenceMatcher(a=spoken, b=draft[:-1], autojunk=False).get_matching_blocks()
        matched += sum(block.size for block in blocks)
        greedy_tokens += len(greedy)
        for length in DRAFT_LENGTHS:
            forwards[length] += oracle_forwards(greedy, draft, length)
    spoken_tokens = greedy_tokens - len(clips)
    print(
        f"model {args.model}; {len(clips)} clips of {args.dataset}; {args.threads} threads; greedy + joint CTC"
    )
    print(
        f"draft agreement: {matched} of {spoken_tokens} spoken tokens ({matched / max(spoken_tokens, 1):.0%})"
    )

    costs = {
        batch: {k: forward_seconds(model.language_model, batch, k + 1) for k in (0, *DRAFT_LENGTHS)}
        for batch in BATCH_SIZES
    }
    header = f"| Draft tokens | Forwards (greedy: {greedy_tokens}) | Saving |"
    header += "".join(f" Forward cost, batch {b} | Best speed-up, batch {b} |" for b in BATCH_SIZES)
    print(header)
    print("| ---: " * (3 + 2 * len(BATCH_SIZES)) + "|")
    for length in DRAFT_LENGTHS:
        saving = greedy_tokens / forwards[length]
        cells = [f"{length}", f"{forwards[length]}", f"{saving:.2f}x"]
        for batch in BATCH_SIZES:
            cost = costs[batch][length] / costs[batch][0]
            cells += [f"{cost:.2f}x ({costs[batch][length] * 1000:.0f} ms)", f"{saving / cost:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print("one-token forward: " + ", ".join(f"batch {b} {costs[b][0] * 1000:.0f} ms" for b in BATCH_SIZES))


if __name__ == "__main__":
    main()
