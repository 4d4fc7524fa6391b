"""The audio tower: the pretrained encoder Tiny Audio reads speech with, frozen but for its top layers when they train.

Whisper's encoder is split into a frozen bottom (what the training feature cache stores) and a top that may train;
wav2vec 2.0-style encoders load whole through `AutoModel`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# Where and how files are fetched: these apply to the encoder's and the LLM's repositories as to the checkpoint's.
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token")


def load_audio_encoder(model_id: str, dtype: torch.dtype | None = None, **load_options) -> PreTrainedModel:
    """Loads only the encoder of a pretrained speech model (Whisper's decoder is dropped)."""
    hub_options = {key: value for key, value in load_options.items() if key in (*HUB_OPTIONS, "revision")}
    config = AutoConfig.from_pretrained(model_id, **hub_options)
    if config.model_type == "whisper":
        return WhisperSpeechEncoder.from_pretrained(
            model_id, dtype=dtype, key_mapping={r"^model\.encoder\.": ""}, **load_options
        )
    return AutoModel.from_pretrained(model_id, dtype=dtype, **load_options)


class WhisperSpeechEncoder(WhisperEncoder):
    """Whisper's encoder, loadable from a full Whisper checkpoint whose decoder weights it leaves behind.

    It runs in two parts, split after layer `split`: the frozen bottom (what the feature cache stores) and, for a
    model whose top layers train, the top. The bottom reads Whisper's whole 30-s window as Whisper does, or only as
    many frames as the longest clip holds (`encoder_real_length`); the top, and a real-length bottom, attend to real
    frames only, so trimmed cached frames, padded batches and single clips all give the same result.
    """

    _keys_to_ignore_on_load_unexpected = [r"^model\.decoder\.", r"^proj_out\."]

    def forward_bottom(
        self,
        input_features: torch.Tensor,
        split: int,
        feature_mask: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Frames after the embedding and the first `split` layers of `WhisperEncoder.forward`; with
        `output_hidden_states`, a tuple of the frames after the embedding and after each of those layers (what the
        voice heads read, `TinyAudioConfig.voice_layer_mix`).

        With the masks of real mel frames and encoder frames, nothing past a clip's end reaches its frames: the
        convolutions see zeros there, as at the end of a clip alone, and attention sees real frames only."""
        if feature_mask is not None:
            input_features = input_features * feature_mask[:, None, :].to(input_features.dtype)
        hidden = nn.functional.gelu(self.conv1(input_features))
        if feature_mask is not None:
            hidden = hidden * feature_mask[:, None, :].to(hidden.dtype)
        hidden = nn.functional.gelu(self.conv2(hidden))
        hidden = hidden.transpose(1, 2) + self.embed_positions.weight[: hidden.shape[2]]
        attention_mask = None if frame_mask is None else _key_mask(frame_mask, hidden.dtype)
        states = [hidden]
        for layer in self.layers[:split]:
            hidden = layer(hidden, attention_mask)
            states.append(hidden)
        return tuple(states) if output_hidden_states else hidden

    def forward_top(self, hidden: torch.Tensor, frame_mask: torch.Tensor, split: int) -> torch.Tensor:
        """The layers after `split` and the final norm, attending to real frames only (`frame_mask`).

        They compute in their own dtype: trained layers stay in fp32 when the frozen ones run in bf16."""
        hidden = hidden.to(self.layer_norm.weight.dtype)
        attention_mask = _key_mask(frame_mask, hidden.dtype)
        for layer in self.layers[split:]:
            hidden = layer(hidden, attention_mask)
        return self.layer_norm(hidden)


def _key_mask(frame_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive [batch, 1, 1, frames] attention mask that hides the frames `frame_mask` leaves out."""
    blocked = torch.zeros(frame_mask.shape, dtype=dtype, device=frame_mask.device)
    return blocked.masked_fill(~frame_mask, torch.finfo(dtype).min)[:, None, None, :]


def build_audio_encoder(audio_config) -> PreTrainedModel:
    """A randomly initialised encoder from a config (tests, and standalone checkpoints before loading)."""
    if audio_config.model_type == "whisper":
        return WhisperSpeechEncoder(audio_config)
    return AutoModel.from_config(audio_config)


__all__ = ["WhisperSpeechEncoder", "build_audio_encoder", "load_audio_encoder"]
