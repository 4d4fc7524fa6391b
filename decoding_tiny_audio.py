"""How Tiny Audio turns scores into text, inside `generate`: the budget of new tokens, the CTC head's scores (the
auxiliary training loss, joint CTC/attention decoding as a `LogitsProcessor`, word alignment) and the
repetition-loop guard (a `StoppingCriteria`, and the trim of the loop it stopped).

The CTC head needs no weights of its own. Through a frozen LLM the next-token loss gives the projector a weak, slow
signal: on a few hours of audio the projector alone stalls at the language model's prior (fluent text unrelated
to the audio). CTC gives every projected frame a direct target instead. Its logits are negative squared distances
to the LLM's input embeddings, so a frame that scores a token highly *is* close to that token's embedding, and the
frozen LLM reads the projected audio as (spaced-out) text. Blank frames are pulled onto the embedding of a neutral
token (`config.ctc_blank_token_id`, a single space by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

try:
    from .processing_tiny_audio import IGNORE_INDEX
except ImportError:
    from processing_tiny_audio import IGNORE_INDEX


# A sentence about the audio (a description, an emotion) is as long whatever the clip's length, unlike a transcript:
# the new tokens the pipeline gives a task other than transcription (the corpus's descriptions take 20 to 45).
SENTENCE_MAX_NEW_TOKENS = 64


def new_token_budget(generation_config: GenerationConfig, audio_seconds: float) -> int | None:
    """The new tokens a clip may take: `max_new_tokens` plus `max_new_tokens_per_second` for each second of its
    audio, so that long speech is never cut short and a short clip cannot run on."""
    if generation_config.max_new_tokens is None:
        return None
    per_second = getattr(generation_config, "max_new_tokens_per_second", 0.0)
    return generation_config.max_new_tokens + int(per_second * audio_seconds)


# ---------------------------------------------------------------------------------------------------------------
# CTC over the projected audio frames
# ---------------------------------------------------------------------------------------------------------------

# What a caller asking for word times hears from a checkpoint without a CTC head (the model and the pipeline).
NO_CTC_HEAD = (
    "word timestamps come from the model's CTC head, and this checkpoint has none: config.ctc_blank_token_id is "
    "unset because it was not trained with the CTC loss (train.py --ctc_weight). Use return_timestamps=True for "
    "chunk-level times."
)


def embedding_ctc_logits(
    audio_embeds: torch.Tensor, embeddings: torch.Tensor, squared_norms: torch.Tensor
) -> torch.Tensor:
    """CTC logits of projected audio frames over tokens: -||h - e||^2, less the ||h||^2 that every token shares.

    A frame scores a token highly when it lies close to that token's LLM input embedding. The auxiliary training
    loss and joint decoding both score with this. `embeddings` is [vocab, dim] or per row [rows, tokens, dim].
    """
    logits = 2 * audio_embeds.to(embeddings.dtype) @ embeddings.detach().transpose(-1, -2)
    return logits.float() - squared_norms.unsqueeze(-2)


def embedding_ctc_loss(
    audio_embeds: torch.Tensor,
    audio_mask: torch.Tensor,
    embeddings: torch.Tensor,
    ctc_targets: torch.Tensor,
    blank_id: int,
) -> torch.Tensor:
    """Mean per-token CTC loss of projected audio frames [batch, frames, dim] (real where `audio_mask`) against
    each row's spoken tokens (`ctc_targets`, right-padded with IGNORE_INDEX; a row of padding only, an answer that
    is no transcript, is left out), scored against the LLM's embedding table; 0 when no row has any."""
    target_lengths = (ctc_targets != IGNORE_INDEX).sum(-1)
    rows = target_lengths > 0
    if not rows.any():
        return audio_embeds.sum() * 0.0
    # The table in the LLM's dtype: bf16 halves the cost of this large matmul.
    squared_norms = embeddings.detach().float().pow(2).sum(-1)
    log_probs = embedding_ctc_logits(audio_embeds[rows], embeddings, squared_norms).log_softmax(-1)
    targets = ctc_targets[rows]
    target_lengths = target_lengths[rows].cpu()
    loss = nn.functional.ctc_loss(
        log_probs.transpose(0, 1),
        targets[targets != IGNORE_INDEX].cpu(),
        audio_mask[rows].sum(-1).cpu(),
        target_lengths,
        blank=blank_id,
        reduction="sum",
        zero_infinity=True,  # a clip too short for its transcript adds nothing rather than inf
    )
    return loss / target_lengths.sum().clamp(min=1)


def ctc_forced_align(
    log_probs: torch.Tensor, targets: Sequence[int], blank: int
) -> list[tuple[int, int]] | None:
    """The likeliest CTC path that spells `targets` over `log_probs` [frames, vocab] (Viterbi), as each target's
    (first, last) frame; None when no path fits (fewer frames than targets plus their doubled letters).

    `torchaudio.functional.forced_align` computes the same path, but no torchaudio build on PyPI loads with the
    CPU torch this project pins (its wheels need CUDA's libc10_cuda), so the recursion is written out here.
    """
    if not targets:
        return []
    frames = log_probs.shape[0]
    if frames < len(targets):
        return None
    # The path runs through blank, t1, blank, t2, ..., blank: state 2i + 1 is target i.
    states = torch.full((2 * len(targets) + 1,), blank, dtype=torch.long, device=log_probs.device)
    states[1::2] = torch.as_tensor(list(targets), device=log_probs.device)
    emit = log_probs.float()[:, states]
    # A target may follow the one before without a blank between them, unless the two are the same token.
    can_skip = torch.zeros_like(states, dtype=torch.bool)
    can_skip[2:] = (states[2:] != blank) & (states[2:] != states[:-2])
    never = torch.tensor(-torch.inf, device=log_probs.device)
    score = torch.full_like(emit[0], -torch.inf)
    score[:2] = emit[0, :2]
    moves = []
    for frame in range(1, frames):
        came_from_previous = torch.cat([never[None], score[:-1]])
        came_from_skip = torch.cat([never.expand(2), score[:-2]]).where(can_skip, never)
        score, move = torch.stack([score, came_from_previous, came_from_skip]).max(0)
        score = score + emit[frame]
        moves.append(move)
    last = len(states) - 1
    state = last if len(states) == 1 or score[last] >= score[last - 1] else last - 1
    if not torch.isfinite(score[state]):
        return None
    path = [state]
    for move in reversed(torch.stack(moves).tolist() if moves else []):
        state -= move[state]
        path.append(state)
    path.reverse()
    spans: list[list[int]] = [[frames, -1] for _ in targets]
    for frame, state in enumerate(path):
        if state % 2:
            span = spans[state // 2]
            span[0], span[1] = min(span[0], frame), max(span[1], frame)
    return [(first, last) for first, last in spans]


class CTCPrefixScorer(LogitsProcessor):
    """Joint CTC/attention decoding (Watanabe et al., 2017) as a logits processor.

    Each step the LLM's `top_k` likeliest next tokens and EOS are rescored with
    `(1 - weight) * log p_llm(token) + weight * (log p_ctc(prefix + token) - log p_ctc(prefix))`, where
    p_ctc(prefix) is the CTC probability (from `embedding_ctc_logits`) that the audio starts with that prefix, and
    for EOS that it holds exactly the prefix. Every other token is ruled out. Stopping early leaves audio
    unexplained and a repeated phrase has no frames to come from, so both cost CTC probability. A row's state is
    found by its prefix, not its position, which makes beam search's reordering harmless.
    """

    def __init__(
        self,
        audio_embeds: torch.Tensor,
        audio_mask: torch.Tensor,
        embeddings: torch.Tensor,
        blank_id: int,
        eos_token_ids: list[int],
        weight: float,
        prompt_length: int,
        top_k: int = 8,
        pad_token_id: int | None = None,
    ):
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"ctc_weight must be in (0, 1], got {weight}")
        self.embeddings = embeddings.detach()
        self.squared_norms = self.embeddings.float().pow(2).sum(-1)
        self.audio = audio_embeds.detach()
        self.lengths = audio_mask.sum(-1).long()
        self.blank_id, self.eos_ids, self.weight = blank_id, sorted(set(eos_token_ids)), weight
        # Tokens the CTC side never emits: the blank, and the EOS/padding that finished rows keep receiving.
        self.silent_ids = {blank_id, *self.eos_ids} | ({pad_token_id} if pad_token_id is not None else set())
        self.prompt_length, self.top_k = prompt_length, top_k
        # Normaliser and blank column of every real frame (padding keeps zeros: nothing reads past a row's length);
        # the other tokens' columns are computed when they are candidates.
        self.normalizers = self.audio.new_zeros(self.audio.shape[:2], dtype=torch.float64)
        blank_log_probs = torch.zeros_like(self.normalizers)
        # one row at a time: [frames, vocab] logits are large
        for row, length in enumerate(self.lengths.tolist()):
            logits = embedding_ctc_logits(self.audio[row, :length], self.embeddings, self.squared_norms)
            self.normalizers[row, :length] = logits.logsumexp(-1).double()
            blank_log_probs[row, :length] = logits[:, blank_id].double() - self.normalizers[row, :length]
        frames = torch.arange(self.audio.shape[1], device=self.audio.device)
        self.valid = frames[None, :] < self.lengths[:, None]
        # state of a prefix: log p(first t+1 frames emit it, ending in a token | in a blank), and its prefix score
        self.blank_cumulative = blank_log_probs.cumsum(-1)
        self.states: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _token_log_probs(self, audio_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[rows, k, frames] CTC log-probabilities of `tokens` [rows, k] on each row's audio."""
        logits = embedding_ctc_logits(
            self.audio[audio_index], self.embeddings[tokens], self.squared_norms[tokens]
        )
        return logits.double().transpose(1, 2) - self.normalizers[audio_index][:, None, :]

    def _empty_state(self, audio_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        no_token = torch.full_like(self.blank_cumulative[audio_index], -torch.inf)
        return no_token, self.blank_cumulative[audio_index], self.blank_cumulative.new_zeros(())

    def _state(
        self, audio_index: int, prefix: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A prefix's state: scored as a candidate one step earlier, or rebuilt token by token if it was not."""
        if not prefix:
            return self._empty_state(audio_index)
        key = (audio_index, prefix)
        if key not in self.states:
            index = torch.tensor([audio_index], device=self.audio.device)
            parent = self._state(audio_index, prefix[:-1])
            token = torch.tensor([[prefix[-1]]], device=self.audio.device)
            extended = self._extend(index, [prefix[:-1]], parent[0][None], parent[1][None], token)
            self.states[key] = tuple(part[0, 0] for part in extended)
        return self.states[key]

    def _extend(
        self,
        audio_index: torch.Tensor,
        prefixes: list[tuple[int, ...]],
        ends_in_token: torch.Tensor,
        ends_in_blank: torch.Tensor,
        tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """States of every prefix (its [rows, frames] forward variables) extended by each of its candidate `tokens`
        [rows, k].

        The CTC forward recursions r_t = (r_{t-1} + phi_{t-1}) * p_t are linear, so each is solved for all frames
        at once: r = cumprod(p) * cumsum(phi / cumprod(p)), in log space with logcumsumexp.
        """
        ends_in_token, ends_in_blank = ends_in_token[:, None, :], ends_in_blank[:, None, :]
        last = torch.tensor([prefix[-1] if prefix else -1 for prefix in prefixes], device=tokens.device)
        log_probs = self._token_log_probs(audio_index, tokens)
        # phi: paths that may emit the new token next; a repeated token needs a blank in between.
        phi = torch.where(
            (tokens == last[:, None])[..., None],
            ends_in_blank,
            torch.logaddexp(ends_in_token, ends_in_blank),
        )
        empty = torch.tensor([not prefix for prefix in prefixes], device=tokens.device)
        first = torch.where(empty[:, None, None], log_probs[..., :1], -torch.inf)
        token_cumulative = log_probs.cumsum(-1)
        steps = torch.cat([first - token_cumulative[..., :1], (phi - token_cumulative)[..., :-1]], -1)
        new_ends_in_token = token_cumulative + steps.logcumsumexp(-1)
        blank_cumulative = self.blank_cumulative[audio_index][:, None, :]
        no_path = torch.full_like(first, -torch.inf)
        steps = torch.cat([no_path, (new_ends_in_token - blank_cumulative)[..., :-1]], -1)
        new_ends_in_blank = blank_cumulative + steps.logcumsumexp(-1)
        emitted = torch.cat([first, phi[..., :-1] + log_probs[..., 1:]], -1)
        valid = self.valid[audio_index][:, None, :]
        prefix_scores = emitted.masked_fill(~valid, -torch.inf).logsumexp(-1)
        return new_ends_in_token, new_ends_in_blank, prefix_scores

    def _prefix(self, tokens: list[int]) -> tuple[int, ...]:
        return tuple(token for token in tokens if token not in self.silent_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        audio_index = torch.arange(rows, device=input_ids.device) // (rows // self.audio.shape[0])
        prefixes = [self._prefix(row) for row in input_ids[:, self.prompt_length :].tolist()]
        parents = [self._state(int(a), p) for a, p in zip(audio_index.tolist(), prefixes, strict=True)]
        ends_in_token, ends_in_blank, parent_scores = (
            torch.stack(part) for part in zip(*parents, strict=True)
        )
        llm_log_probs = scores.float().log_softmax(-1)
        ruled_out = llm_log_probs.clone()
        ruled_out[:, sorted(self.silent_ids)] = -torch.inf
        candidates = ruled_out.topk(min(self.top_k, ruled_out.shape[-1]), -1).indices
        child_token, child_blank, prefix_scores = self._extend(
            audio_index, prefixes, ends_in_token, ends_in_blank, candidates
        )
        # A prefix the audio cannot hold (forced in from outside) leaves the choice to the LLM alone.
        possible = parent_scores.isfinite()
        out = torch.full_like(llm_log_probs, -torch.inf)
        ctc_gain = torch.where(possible[:, None], prefix_scores - parent_scores[:, None], 0.0).float()
        # picked is -inf only where the vocabulary has fewer than top_k tokens to offer
        picked = ruled_out.gather(-1, candidates)
        joint = (1 - self.weight) * picked + self.weight * ctc_gain
        out.scatter_(-1, candidates, joint.masked_fill(picked.isinf(), -torch.inf))
        last_frame = (self.lengths[audio_index] - 1).clamp(min=0)[:, None]
        whole = torch.logaddexp(ends_in_token, ends_in_blank).gather(-1, last_frame)[:, 0]
        eos_gain = torch.where(possible, whole - parent_scores, 0.0).float()[:, None]
        out[:, self.eos_ids] = (1 - self.weight) * llm_log_probs[:, self.eos_ids] + self.weight * eos_gain
        # Keep what the next step can ask for: this step's prefixes (finished rows) and their candidates.
        self.states = {}
        for row, (audio, prefix) in enumerate(zip(audio_index.tolist(), prefixes, strict=True)):
            self.states[(audio, prefix)] = parents[row]
            for k, token in enumerate(candidates[row].tolist()):
                self.states[(audio, prefix + (token,))] = (
                    child_token[row, k],
                    child_blank[row, k],
                    prefix_scores[row, k],
                )
        return out


# ---------------------------------------------------------------------------------------------------------------
# Repetition-loop guard
# ---------------------------------------------------------------------------------------------------------------


def find_repetition_loop(
    tokens: list[int], max_period: int = 12, min_repeats: int = 4, min_span: int = 16, near_period: int = 6
) -> tuple[int, int] | None:
    """(start, period) of a trailing run where a ``period``-token unit repeats to cover at least
    ``max(min_repeats * period, min_span)`` tokens; None if there is none.

    A short unit must repeat many times ("okay" x16), a long one only a few times (a sentence x4), which normal
    speech ("no no no", "very very") does not reach.  Units of ``near_period`` tokens or more may differ from the
    copy before in one token: a counting loop ("or 13 to increase the volume, or 14 to increase the volume, ...")
    changes only its number.
    """
    n = len(tokens)
    for period in range(1, max_period + 1):
        run = _repeating_run(tokens, period, tolerate_one=period >= near_period)
        span = run + period
        if span >= max(min_repeats * period, min_span):
            return n - span, period
    return None


def _repeating_run(tokens: list[int], period: int, tolerate_one: bool) -> int:
    """How many trailing tokens equal the token ``period`` before them, walking back from the end.

    With ``tolerate_one``, a mismatch is let through when the previous one is at least a period away.  When the
    walk then stops, a let-through mismatch that recurred every period was the loop's changing token and the loop
    starts at the stop; a lone one was already the text before the loop, so the loop starts after it.
    """
    n = len(tokens)
    mismatches: list[int] = []
    for run in range(n - period):
        i = n - 1 - run
        if tokens[i] == tokens[i - period]:
            continue
        if tolerate_one and (not mismatches or mismatches[-1] - i >= period):
            mismatches.append(i)
            continue
        periodic = len(mismatches) >= 2 and mismatches[-2] - mismatches[-1] == period
        return run if periodic or not mismatches else n - 1 - mismatches[-1]
    return n - period


class RepetitionLoopGuard(StoppingCriteria):
    """Stops the sequences of a batch whose newest tokens have fallen into a repetition loop.

    Counts its own calls (one per generated token) so it only looks at new tokens, whatever the prompt layout.
    """

    def __init__(self, **loop_kwargs: int) -> None:
        self.loop_kwargs = loop_kwargs
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        new = input_ids[:, -self.steps :].tolist()
        flags = [find_repetition_loop(row, **self.loop_kwargs) is not None for row in new]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


def trim_repetition_loop(tokens: list[int]) -> list[int]:
    """Keep one copy of a trailing loop's unit and drop the rest."""
    loop = find_repetition_loop(tokens)
    return tokens if loop is None else tokens[: loop[0] + loop[1]]


def blank_repetition_loops(
    sequences: torch.LongTensor, prompt_length: int, pad_token_id: int, special_ids: set[int]
) -> torch.LongTensor:
    """`sequences` with each row's trailing loop (past one copy of its unit) replaced by padding, so that decoding
    with ``skip_special_tokens=True`` gives the text without the loop. The loop is sought in the text tokens."""
    trimmed = sequences.clone()
    for row, tokens in enumerate(sequences[:, prompt_length:].tolist()):
        text_positions = [i for i, token in enumerate(tokens) if token not in special_ids]
        kept = len(trim_repetition_loop([tokens[i] for i in text_positions]))
        for i in text_positions[kept:]:
            trimmed[row, prompt_length + i] = pad_token_id
    return trimmed
