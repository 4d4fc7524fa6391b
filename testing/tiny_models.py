"""Tiny random encoders and LLMs built from configs, saved like real checkpoints (no downloads)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    SmolLM3Config,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from modeling_tiny_audio import TinyAudioForConditionalGeneration
from processing_tiny_audio import TinyAudioProcessor

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolLM3's chat format, written here from its model card (no copy of the Hub file is available offline): a
# system turn with a metadata block whose "Reasoning Mode" is /think unless `enable_thinking=False` or the system
# message says /no_think, then ChatML turns; with reasoning off, the generation prompt closes an empty think block.
# Tool calling (xml_tools, python_tools) is left out: Tiny Audio never passes tools.
SMOLLM3_TEMPLATE = (
    "{%- set thinking = enable_thinking if enable_thinking is defined else true -%}"
    "{%- set instructions = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face.' -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] -%}"
    "{%- if '/no_think' in system_text -%}{%- set thinking = false -%}"
    "{%- elif '/think' in system_text -%}{%- set thinking = true -%}{%- endif -%}"
    "{%- set instructions = system_text.replace('/no_think', '').replace('/think', '').strip() -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nKnowledge Cutoff Date: June 2025\\n' -}}"
    "{{- 'Today Date: ' + strftime_now('%d %B %Y') + '\\n' -}}"
    "{{- 'Reasoning Mode: ' + ('/think' if thinking else '/no_think') + '\\n\\n' -}}"
    "{{- '## Custom Instructions\\n\\n' + instructions + '\\n\\n<|im_end|>\\n' -}}"
    "{%- for message in turns -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' + ('' if thinking else '<think>\\n\\n</think>\\n') -}}"
    "{%- endif -%}"
)
THINK_TOKENS = ["<think>", "</think>"]
TOKENIZER_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "transcribe the speech describe the audio what emotion does the speaker express",
    "hello world this is a tiny tokenizer for tests of tiny audio",
    "one two three four five six seven eight nine ten",
]
WAV2VEC_CONV = {"conv_dim": (16, 16), "conv_kernel": (10, 3), "conv_stride": (5, 2)}
TINY_ENCODER_SIZE = 16


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with ChatML special tokens, trained on a few sentences."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_encoder(directory: str | Path, kind: str = "whisper", num_layers: int = 1) -> str:
    """Saves a random tiny encoder checkpoint (with its feature extractor) and returns its folder. ``kind`` is
    "whisper", "hubert", "wav2vec2", "wavlm" (layer-norm feature encoders, like the large checkpoints) or
    "wav2vec2-group" (group norm over time in the first convolution, like wav2vec2-base and hubert-base)."""
    directory = Path(directory)
    if kind == "whisper":
        config = WhisperConfig(
            d_model=TINY_ENCODER_SIZE,
            encoder_layers=num_layers,
            encoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=32,
            num_mel_bins=80,
            vocab_size=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            max_source_positions=1500,
            max_target_positions=32,
        )
        model = WhisperForConditionalGeneration(config)
        extractor = WhisperFeatureExtractor(feature_size=80)
    else:
        common = {
            "hidden_size": TINY_ENCODER_SIZE,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "num_conv_pos_embeddings": 4,
            "num_conv_pos_embedding_groups": 2,
            "feat_extract_norm": "layer",
            "do_stable_layer_norm": True,
            **WAV2VEC_CONV,
        }
        if kind == "wav2vec2-group":
            kind = "wav2vec2"
            common |= {"feat_extract_norm": "group", "do_stable_layer_norm": False}
        config_class, model_class = {
            "hubert": (HubertConfig, HubertModel),
            "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
            "wavlm": (WavLMConfig, WavLMModel),
        }[kind]
        model = model_class(config_class(**common))
        extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
    model.save_pretrained(directory)
    extractor.save_pretrained(directory)
    return str(directory)


def make_tiny_llm(directory: str | Path, kind: str = "llama") -> str:
    """Saves a random tiny causal LM with tied embeddings plus a real tokenizer and returns its folder (SmolLM3
    with its own chat format, the others with ChatML)."""
    directory = Path(directory)
    tokenizer = make_tiny_tokenizer()
    if kind == "smollm3":  # its chat template and its think markers, special tokens as in SmolLM3's tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": THINK_TOKENS})
        tokenizer.chat_template = SMOLLM3_TEMPLATE
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    config_class = {"llama": LlamaConfig, "qwen3": Qwen3Config, "smollm3": SmolLM3Config}[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    model = AutoModelForCausalLM.from_config(config_class(**common, **extra))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def make_tiny_tiny_audio(
    directory: str | Path,
    encoder: str = "whisper",
    llm: str = "llama",
    encoder_layers: int = 1,
    **config_kwargs,
) -> tuple[TinyAudioForConditionalGeneration, TinyAudioProcessor]:
    """A Tiny Audio model and processor over freshly saved tiny encoder and LLM folders in `directory`."""
    directory = Path(directory)
    encoder_dir = make_tiny_encoder(directory / f"encoder-{encoder}", encoder, encoder_layers)
    llm_dir = make_tiny_llm(directory / f"llm-{llm}", llm)
    model = TinyAudioForConditionalGeneration.from_components(encoder_dir, llm_dir, **config_kwargs)
    processor = TinyAudioProcessor.from_components(encoder_dir, llm_dir, config=model.config)
    return model.eval(), processor
