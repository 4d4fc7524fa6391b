"""Auxiliary CTC loss that pulls each projected audio frame onto the LLM embedding of the token it speaks.

Through a frozen LLM the next-token loss gives the projector a weak, slow signal: on a few hours of audio the
projector alone stalls at the language model's prior (fluent text unrelated to the audio). CTC gives every frame
a direct target instead. Its logits are negative squared distances to the LLM's input embeddings, so a frame that
scores a token highly *is* close to that token's embedding, and the frozen LLM reads the projected audio as
(spaced-out) text. Blank frames are pulled onto the embedding of a neutral token (a single space by default).

The loss needs no new weights: it is a training aid only and nothing of it is saved with the model.
"""

from __future__ import annotations

import torch
from torch import nn

from decoding_tiny_audio import embedding_ctc_logits
from processing_tiny_audio import IGNORE_INDEX


class EmbeddingCTCLoss:
    """CTC between projected audio frames and the answer tokens, scored against the LLM's embedding table."""

    def __init__(self, embeddings: nn.Embedding, blank_id: int, skip_ids: list[int]):
        self.embeddings = embeddings
        self.blank_id = blank_id
        self.skip_ids = torch.tensor(sorted(set(skip_ids)), dtype=torch.long)
        self._squared_norms: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, tokenizer, blank_token: str = " ") -> EmbeddingCTCLoss:
        blank = tokenizer(blank_token, add_special_tokens=False)["input_ids"]
        if len(blank) != 1:
            raise ValueError(f"ctc_blank_token {blank_token!r} must be a single token, got ids {blank}")
        return cls(model.get_input_embeddings(), blank[0], tokenizer.all_special_ids)

    def frame_log_probs(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        """[batch, frames, vocab] log-probabilities: logit_v = -||h - e_v||^2 (the ||h||^2 term cancels)."""
        table = self.embeddings.weight  # the LLM's dtype: bf16 halves the cost of this large matmul
        if self._squared_norms is None:
            self._squared_norms = table.detach().float().pow(2).sum(-1)
        return embedding_ctc_logits(audio_embeds, table, self._squared_norms).log_softmax(-1)

    def targets(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """The spoken tokens of each row: its answer labels without special tokens (EOS) or blanks."""
        rows = []
        for row in labels:
            tokens = row[row != IGNORE_INDEX]
            drop = torch.isin(tokens, self.skip_ids.to(tokens.device)) | (tokens == self.blank_id)
            rows.append(tokens[~drop])
        return rows

    def __call__(
        self,
        audio_embeds: torch.Tensor,
        audio_mask: torch.Tensor,
        labels: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean per-token CTC loss over `rows` (default: all) of the batch; 0 when no row has a transcript."""
        targets = self.targets(labels)
        keep = [i for i, t in enumerate(targets) if len(t) and (rows is None or bool(rows[i]))]
        if not keep:
            return audio_embeds.sum() * 0.0
        log_probs = self.frame_log_probs(audio_embeds[keep])
        target_lengths = torch.tensor([len(targets[i]) for i in keep])
        loss = nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            torch.cat([targets[i] for i in keep]).cpu(),
            audio_mask[keep].sum(-1).cpu(),
            target_lengths,
            blank=self.blank_id,
            reduction="sum",
            zero_infinity=True,  # a clip too short for its transcript adds nothing rather than inf
        )
        return loss / target_lengths.sum().clamp(min=1)
