"""LoRA on Tiny Audio's LLM, and the one-way changes that turn a trained model into a serving one (merged adapters,
int8 LLM): a mixin of `TinyAudioForConditionalGeneration`, which holds the LLM as `language_model`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# Marks the weight names of LoRA adapters (peft's `lora_A` / `lora_B`): trained, though inside the frozen LLM.
LORA_MARKER = ".lora_"
# peft's adapter names: the LLM's own LoRA (`lora_rank`), and the one the voice tasks add (`voice_lora_rank`).
DEFAULT_ADAPTER = "default"
VOICE_ADAPTER = "voice"


def is_voice_adapter_weight(name: str) -> bool:
    """Whether a weight name belongs to the voice tasks' LoRA adapter (`lora_A.voice.weight`, ...)."""
    return LORA_MARKER in name and f".{VOICE_ADAPTER}." in name


class LoraMixin:
    """LoRA's lifecycle on the LLM (`config.lora_*`): added at construction, widened by a continued run, merged for
    serving; and int8 serving. A merged or quantized model is serving-only: it refuses to train and to save its
    full weights (`serving_only_reason`)."""

    def _add_lora(
        self,
        target_modules: Sequence[str] | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        rank: int | None = None,
    ) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise ImportError("LoRA (lora_rank > 0) needs the `peft` package: pip install peft") from error

        lora = LoraConfig(
            r=rank or self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(target_modules or self.config.lora_target_modules),
        )
        with warnings.catch_warnings():
            # peft warns whenever a model gets a second adapter; the voice adapter is one by design.
            warnings.filterwarnings("ignore", message=r".*multiple adapters in the model.*")
            inject_adapter_in_model(lora, self.language_model, adapter_name=adapter_name)
        if self.config.voice_lora_rank:  # a new adapter may start active: the voice one waits for its tasks
            self._activate_voice_adapter(False)

    def _add_voice_adapter(self) -> None:
        self._add_lora(adapter_name=VOICE_ADAPTER, rank=self.config.voice_lora_rank)

    def add_voice_adapter(self, rank: int) -> None:
        """Adds the voice tasks' LoRA adapter (`config.voice_lora_rank`) to a model with voice heads, for a continued
        run. It starts at zero (LoRA's B), so descriptions are unchanged until it trains."""
        if not self.config.voice_attributes:
            raise ValueError("the voice tokens turn a voice adapter on: add voice_attributes first")
        if self._keeps_setting("voice_lora_rank", rank):
            return
        self.config.voice_lora_rank = rank
        self.config.validate()
        self._add_voice_adapter()
        self.freeze_pretrained()

    def _activate_voice_adapter(self, active: bool) -> None:
        """Turns the voice adapter on or off in every LoRA layer, leaving which weights train as it was (peft's
        `set_adapter` also marks the active adapters trainable)."""
        for layer in self._lora_layers():
            names = [name for name in layer.lora_A if name != VOICE_ADAPTER or active]
            if names == layer.active_adapters:
                continue
            trains = {parameter: parameter.requires_grad for parameter in layer.parameters()}
            layer.set_adapter(names)
            for parameter, requires_grad in trains.items():
                parameter.requires_grad = requires_grad

    @contextlib.contextmanager
    def voice_adapter_for(self, input_ids: torch.Tensor | None) -> Iterator[None]:
        """Runs the block with the voice adapter on if the prompts in `input_ids` are those of voice tasks (they hold
        voice placeholders), off if not. Nested calls (the decoding steps inside `generate`, whose new tokens hold
        no placeholders) keep the outer choice. A model without a voice adapter runs the block as it is."""
        if not self.config.voice_lora_rank or input_ids is None or self._voice_adapter_set:
            yield
            return
        voice_rows = (input_ids == self.config.voice_token_id).any(-1)
        if voice_rows.any() and not voice_rows.all():
            raise ValueError(
                f"rows {voice_rows.nonzero().flatten().tolist()} of this batch ask a voice task "
                f"({', '.join(self.config.voice_tasks or [])}) and the others do not: a model with a voice adapter "
                "(voice_lora_rank) runs them in separate batches"
            )
        self._activate_voice_adapter(bool(voice_rows.all()))
        self._voice_adapter_set = True
        try:
            yield
        finally:
            self._voice_adapter_set = False
            self._activate_voice_adapter(False)

    def extend_lora(self, target_modules: Sequence[str]) -> None:
        """Adapts more LLM modules with LoRA, keeping the trained adapters: a continued run can widen LoRA.

        The new adapters start at zero (LoRA's B), so the model's output is unchanged until they train.
        """
        if self.config.lora_rank == 0:
            raise ValueError("this checkpoint has no LoRA (lora_rank 0): train a new model to add it")
        current = list(self.config.lora_target_modules)
        dropped = sorted(set(current) - set(target_modules))
        if dropped:
            raise ValueError(
                f"lora_target_modules must keep the checkpoint's trained adapters; missing {dropped}"
            )
        added = [module for module in target_modules if module not in current]
        if added and self.config.voice_lora_rank:
            raise ValueError(
                f"the voice adapter covers this checkpoint's lora_target_modules {current}; LoRA cannot widen to "
                f"{added} after it"
            )
        if added:
            self._add_lora(added)
            self.config.lora_target_modules = current + added
            self.freeze_pretrained()

    def _lora_layers(self) -> list[nn.Module]:
        if not (self.config.lora_rank or self.config.voice_lora_rank):
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [module for module in self.language_model.modules() if isinstance(module, BaseTunerLayer)]

    @property
    def lora_merged(self) -> bool:
        return any(layer.merged for layer in self._lora_layers())

    def merge_lora(self) -> None:
        """Folds each LoRA adapter into its LLM weight for serving: the same outputs without the adapters' matmuls.

        One way only (unmerging is not exact in low precision): a merged model refuses to train and to save its
        full weights. Its trainable weights are untouched, so a projector-only save stays correct. A model with a
        voice adapter keeps its adapters apart: peft skips every adapter of a merged layer, and the voice tasks need
        theirs switched on and off.
        """
        if self.config.voice_lora_rank:
            return
        for layer in self._lora_layers():
            if not layer.merged:
                layer.merge()

    def quantize_llm_int8(self) -> None:
        """Swaps the LLM's linear layers, head included, for dynamic int8 ones (int8 weights, activations quantized
        per call) for faster CPU serving at some cost in accuracy: README "Benchmarks" gives both.

        Serving only and one way, as `merge_lora` (which it applies first): the model then refuses to train and
        to save its full weights. torch's int8 kernels (fbgemm/onednn) are CPU kernels.
        """
        if self.language_model.device.type != "cpu":
            raise ValueError(f"int8 serving runs on the CPU; this LLM is on {self.language_model.device}")
        self.merge_lora()
        with warnings.catch_warnings():
            # torch marks its eager quantization API deprecated in favour of the torchao package; it is kept here
            # because it needs no extra package and runs fbgemm's int8 kernels without compilation.
            warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quantize_per_tensor).*")
            from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

            # The LLM's own layers only: merged adapters stay as they are, so the trained weights save unchanged.
            layers = {
                name: default_dynamic_qconfig
                for name, module in self.language_model.named_modules()
                if isinstance(module, nn.Linear) and LORA_MARKER not in name
            }
            quantize_dynamic(self.language_model, layers, dtype=torch.qint8, inplace=True)

    @property
    def llm_quantized(self) -> bool:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        return any(isinstance(module, DynamicQuantizedLinear) for module in self.language_model.modules())

    def serving_only_reason(self) -> str | None:
        """Why this model can no longer train or save its full weights, if it can't."""
        if self.llm_quantized:
            return "this model's LLM was quantized to int8 for serving (quantize_llm_int8)"
        if self.lora_merged:
            return "this model's LoRA adapters were merged into the LLM for serving (merge_lora)"
        return None


__all__ = ["DEFAULT_ADAPTER", "LORA_MARKER", "VOICE_ADAPTER", "LoraMixin", "is_voice_adapter_weight"]
