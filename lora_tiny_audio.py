"""LoRA on Tiny Audio's LLM, and the one-way changes that turn a trained model into a serving one (merged adapters,
int8 LLM): a mixin of `TinyAudioForConditionalGeneration`, which holds the LLM as `language_model`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

# Marks the weight names of LoRA adapters (peft's `lora_A` / `lora_B`): trained, though inside the frozen LLM.
LORA_MARKER = ".lora_"


class LoraMixin:
    """LoRA's lifecycle on the LLM (`config.lora_*`): added at construction, widened by a continued run, merged for
    serving; and int8 serving. A merged or quantized model is serving-only: it refuses to train and to save its
    full weights (`serving_only_reason`)."""

    def _add_lora(self, target_modules: Sequence[str] | None = None) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise ImportError("LoRA (lora_rank > 0) needs the `peft` package: pip install peft") from error

        lora = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(target_modules or self.config.lora_target_modules),
        )
        inject_adapter_in_model(lora, self.language_model)

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
        if added:
            self._add_lora(added)
            self.config.lora_target_modules = current + added
            self.freeze_pretrained()

    def _lora_layers(self) -> list[nn.Module]:
        if self.config.lora_rank == 0:
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [module for module in self.language_model.modules() if isinstance(module, BaseTunerLayer)]

    @property
    def lora_merged(self) -> bool:
        return any(layer.merged for layer in self._lora_layers())

    def merge_lora(self) -> None:
        """Folds each LoRA adapter into its LLM weight for serving: the same outputs without the adapters' matmuls.

        One way only (unmerging is not exact in low precision): a merged model refuses to train and to save its
        full weights. Its trainable weights are untouched, so a projector-only save stays correct.
        """
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


__all__ = ["LORA_MARKER", "LoraMixin"]
