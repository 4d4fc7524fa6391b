"""Convert a CTranslate2 / faster-whisper Whisper folder into a transformers Whisper checkpoint.

Air-gapped users often already have faster-whisper models on disk (``model.bin`` + ``config.json`` +
``tokenizer.json``) but no Hub access.  This module reads ``model.bin`` directly (no ctranslate2 needed),
undoes CTranslate2's layer fusion and quantization, and writes a normal ``WhisperForConditionalGeneration``
folder (safetensors, config, generation config, feature extractor, tokenizer, processor).

Run: ``python -m offline_kit.whisper_ct2 SRC_CT2_DIR OUT_DIR [--dtype float32]``.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from offline_kit import DTYPE_NAMES, run_converter_cli, save_converted

# CTranslate2's DataType enum (include/ctranslate2/types.h): type id -> torch dtype.
_CT2_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
_SUPPORTED_BINARY_VERSIONS = (4, 5, 6)  # versions that store a dtype id + byte count per variable


@dataclass
class CT2Model:
    """The raw content of a CTranslate2 ``model.bin``: stored tensors (possibly quantized) and aliases."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def _resolve(self, name: str) -> str:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(
                f"{self.path}: variable {name!r} not found (is this a {self.spec} of another layout?)"
            )
        return name

    def raw(self, name: str) -> torch.Tensor:
        """The variable as stored (aliases resolved, no dequantization)."""
        return self.variables[self._resolve(name)]

    def has(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def tensor(self, name: str) -> torch.Tensor:
        """A fresh float32 copy of the variable, dequantized with its ``<name>_scale`` when stored as int8/int16.

        Always a copy: aliased variables (CTranslate2 deduplicates equal tensors) must not share memory
        in the converted checkpoint.
        """
        name = self._resolve(name)
        value = self.variables[name]
        if value.is_floating_point():
            return value.to(torch.float32, copy=True)
        scale = self.variables.get(f"{name}_scale")
        if scale is None:
            raise ValueError(
                f"{self.path}: {name!r} is stored as {value.dtype} but has no {name}_scale variable"
            )
        # int8 scales are per output row (conv weights are quantized as [out, in*k]); int16 has one scale.
        scale = scale.float().reshape(-1, *([1] * (value.dim() - 1))) if scale.dim() else scale.float()
        return value.float() / scale

    def scalar(self, name: str) -> int:
        return int(self.raw(name).item())


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (little-endian header, then variables, then aliases)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"CTranslate2 model file not found: {path}")
    with path.open("rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        try:
            values = struct.unpack_from("<" + fmt, data, offset)
        except struct.error as err:
            raise ValueError(f"{path}: truncated or corrupt model.bin at byte {offset}") from err
        offset += struct.calcsize("<" + fmt)
        return values

    def take_string() -> str:
        nonlocal offset
        (length,) = take("H")  # length includes the trailing NUL
        text = bytes(data[offset : offset + length - 1]).decode("utf-8")
        offset += length
        return text

    (binary_version,) = take("I")
    if binary_version not in _SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{path}: model.bin binary version {binary_version} is not supported "
            f"(supported: {_SUPPORTED_BINARY_VERSIONS}); re-convert it with a recent ctranslate2"
        )
    spec = take_string()
    (revision,) = take("I")
    (num_variables,) = take("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(num_variables):
        name = take_string()
        (rank,) = take("B")
        shape = take(f"{rank}I") if rank else ()
        type_id, num_bytes = take("BI")
        if type_id not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        if offset + num_bytes > len(data):
            raise ValueError(f"{path}: variable {name!r} runs past the end of the file (truncated download?)")
        raw = bytearray(data[offset : offset + num_bytes])  # a private copy: torch wants writable memory
        offset += num_bytes
        variables[name] = torch.frombuffer(raw, dtype=_CT2_DTYPES[type_id]).reshape(shape)
    aliases: dict[str, str] = {}
    (num_aliases,) = take("I")
    for _ in range(num_aliases):
        alias = take_string()
        aliases[alias] = take_string()
    data.close()
    return CT2Model(path, binary_version, spec, revision, variables, aliases)


def _count_layers(model: CT2Model, prefix: str) -> int:
    count = 0
    while model.has(f"{prefix}/layer_{count}/ffn/linear_0/weight"):
        count += 1
    return count


def _linear(model: CT2Model, scope: str, hf_prefix: str) -> dict[str, torch.Tensor]:
    out = {f"{hf_prefix}.weight": model.tensor(f"{scope}/weight")}
    if model.has(f"{scope}/bias"):
        out[f"{hf_prefix}.bias"] = model.tensor(f"{scope}/bias")
    return out


def _layer_norm(model: CT2Model, scope: str, hf_prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{hf_prefix}.weight": model.tensor(f"{scope}/gamma"),
        f"{hf_prefix}.bias": model.tensor(f"{scope}/beta"),
    }


def _split_fused(
    model: CT2Model, scope: str, hf_prefixes: list[str], prefix_without_bias: str
) -> dict[str, torch.Tensor]:
    """Undo CTranslate2's fusion of q|k|v (or k|v) projections along the output dimension.

    Whisper's k_proj has no bias; CTranslate2 stores zeros there.  Dropping any k bias is exact anyway:
    it adds the same q.b_k to every key's score, which softmax cancels.
    """
    weights = model.tensor(f"{scope}/weight").chunk(len(hf_prefixes), dim=0)
    biases = model.tensor(f"{scope}/bias").chunk(len(hf_prefixes), dim=0)
    out: dict[str, torch.Tensor] = {}
    for prefix, weight, bias in zip(hf_prefixes, weights, biases, strict=True):
        out[f"{prefix}.weight"] = weight.clone()  # own storage, not a view of the fused tensor
        if prefix != prefix_without_bias:
            out[f"{prefix}.bias"] = bias.clone()
    return out


def _self_attention(model: CT2Model, scope: str, hf_layer: str) -> dict[str, torch.Tensor]:
    attn = f"{hf_layer}.self_attn"
    return {
        **_layer_norm(model, f"{scope}/self_attention/layer_norm", f"{hf_layer}.self_attn_layer_norm"),
        **_split_fused(
            model,
            f"{scope}/self_attention/linear_0",
            [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"],
            f"{attn}.k_proj",
        ),
        **_linear(model, f"{scope}/self_attention/linear_1", f"{attn}.out_proj"),
    }


def _ffn(model: CT2Model, scope: str, hf_layer: str) -> dict[str, torch.Tensor]:
    return {
        **_layer_norm(model, f"{scope}/ffn/layer_norm", f"{hf_layer}.final_layer_norm"),
        **_linear(model, f"{scope}/ffn/linear_0", f"{hf_layer}.fc1"),
        **_linear(model, f"{scope}/ffn/linear_1", f"{hf_layer}.fc2"),
    }


def whisper_state_dict(model: CT2Model) -> dict[str, torch.Tensor]:
    """Map a CTranslate2 WhisperSpec onto ``WhisperForConditionalGeneration`` parameter names (float32)."""
    if model.spec != "WhisperSpec":
        raise ValueError(
            f"{model.path}: spec is {model.spec!r}, expected 'WhisperSpec' (not a Whisper model)"
        )
    if model.has("decoder/activation") and model.scalar("decoder/activation") != _CT2_GELU:
        raise ValueError(f"{model.path}: decoder activation is not GELU; not a Whisper layout")
    sd: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        sd.update(_linear(model, f"encoder/{conv}", f"model.encoder.{conv}"))
    sd["model.encoder.embed_positions.weight"] = model.tensor("encoder/position_encodings/encodings")
    sd.update(_layer_norm(model, "encoder/layer_norm", "model.encoder.layer_norm"))
    for i in range(_count_layers(model, "encoder")):
        scope, hf_layer = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        sd.update(_self_attention(model, scope, hf_layer))
        sd.update(_ffn(model, scope, hf_layer))

    sd["model.decoder.embed_tokens.weight"] = model.tensor("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = model.tensor("decoder/position_encodings/encodings")
    sd.update(_layer_norm(model, "decoder/layer_norm", "model.decoder.layer_norm"))
    for i in range(_count_layers(model, "decoder")):
        scope, hf_layer = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        cross = f"{hf_layer}.encoder_attn"
        sd.update(_self_attention(model, scope, hf_layer))
        sd.update(_layer_norm(model, f"{scope}/attention/layer_norm", f"{hf_layer}.encoder_attn_layer_norm"))
        sd.update(_linear(model, f"{scope}/attention/linear_0", f"{cross}.q_proj"))
        sd.update(
            _split_fused(
                model,
                f"{scope}/attention/linear_1",
                [f"{cross}.k_proj", f"{cross}.v_proj"],
                f"{cross}.k_proj",
            )
        )
        sd.update(_linear(model, f"{scope}/attention/linear_2", f"{cross}.out_proj"))
        sd.update(_ffn(model, scope, hf_layer))
    projection = model.tensor("decoder/projection/weight")
    if not torch.equal(projection, sd["model.decoder.embed_tokens.weight"]):
        sd["proj_out.weight"] = projection
    return sd


def whisper_config(
    model: CT2Model, ct2_config: dict, tokenizer: WhisperTokenizer, tie_word_embeddings: bool
) -> WhisperConfig:
    """Rebuild the architecture hyper-parameters from tensor shapes and the stored head counts."""
    conv1 = model.raw("encoder/conv1/weight")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return WhisperConfig(
        vocab_size=model.raw("decoder/embeddings/weight").shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=conv1.shape[0],
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=model.raw("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=model.raw("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=model.raw("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.raw("decoder/position_encodings/encodings").shape[0],
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        tie_word_embeddings=tie_word_embeddings,
    )


ENGLISH_ONLY_VOCAB_SIZE = 51864


def whisper_generation_config(
    config: WhisperConfig, ct2_config: dict, tokenizer: WhisperTokenizer
) -> GenerationConfig:
    """The generation settings ``WhisperForConditionalGeneration.generate`` needs (languages, tasks, suppression)."""
    lang_ids = ct2_config.get("lang_ids") or []
    token = tokenizer.convert_tokens_to_ids
    # English-only Whisper (.en) has exactly 51864 tokens; CTranslate2 still lists language ids for it.
    multilingual = bool(lang_ids) and config.vocab_size != ENGLISH_ONLY_VOCAB_SIZE
    extra = {}
    if multilingual:
        extra["lang_to_id"] = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
        extra["task_to_id"] = {"transcribe": token("<|transcribe|>"), "translate": token("<|translate|>")}
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        no_timestamps_token_id=token("<|notimestamps|>"),
        prev_sot_token_id=token("<|startofprev|>"),
        alignment_heads=ct2_config.get("alignment_heads"),
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        **extra,
    )


def _load_tokenizer(src: Path) -> WhisperTokenizer:
    tokenizer_file = src / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{tokenizer_file} is missing: the CTranslate2 folder must contain the Whisper tokenizer.json "
            "(faster-whisper folders ship it; otherwise convert with --copy_files tokenizer.json)"
        )
    # Whisper pads with <|endoftext|>; without a pad token the stock pipeline refuses to batch.
    return WhisperTokenizer(tokenizer_file=str(tokenizer_file), pad_token="<|endoftext|>")


def _load_feature_extractor(src: Path, num_mel_bins: int) -> WhisperFeatureExtractor:
    if (src / "preprocessor_config.json").is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(str(src))
        if extractor.feature_size != num_mel_bins:
            raise ValueError(
                f"{src / 'preprocessor_config.json'}: feature_size {extractor.feature_size} does not match the "
                f"model's {num_mel_bins} mel bins"
            )
        return extractor
    return WhisperFeatureExtractor(feature_size=num_mel_bins)


def convert_ct2_whisper(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Convert the CTranslate2 Whisper folder ``src`` into a transformers checkpoint folder ``out``."""
    src, out = Path(src), Path(out)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    config_file = src / "config.json"
    ct2_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    ct2_model = read_ct2_model(src)
    tokenizer = _load_tokenizer(src)
    state_dict = {k: v.to(getattr(torch, dtype)) for k, v in whisper_state_dict(ct2_model).items()}
    config = whisper_config(
        ct2_model, ct2_config, tokenizer, tie_word_embeddings="proj_out.weight" not in state_dict
    )
    del ct2_model
    config.dtype = dtype
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (k == "proj_out.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{src}: weight mapping mismatch; missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.generation_config = whisper_generation_config(config, ct2_config, tokenizer)
    processor = WhisperProcessor(_load_feature_extractor(src, config.num_mel_bins), tokenizer)
    return save_converted(out, model, processor)


def main(argv: list[str] | None = None) -> None:
    run_converter_cli(
        argv,
        "offline_kit.whisper_ct2",
        "Convert a CTranslate2/faster-whisper Whisper folder into a transformers checkpoint.",
        "folder with model.bin, config.json and tokenizer.json",
        convert_ct2_whisper,
    )


if __name__ == "__main__":
    main()
