"""The LoRA engine: layers that wrap base modules, injection, merge/unmerge, PEFT-format adapter files."""
from loraforge.lora.adapter import load_adapter, read_adapter_config, save_adapter
from loraforge.lora.combine import Combined, combine, combine_adapters
from loraforge.lora.config import LoraConfig
from loraforge.lora.layer import LoraEmbedding, LoraLinear
from loraforge.lora.model import LoraModel, ParamReport
from loraforge.lora.targets import default_target_modules, layer_summary

__all__ = [
    "Combined", "LoraConfig", "LoraEmbedding", "LoraLinear", "LoraModel", "ParamReport", "combine", "combine_adapters",
    "default_target_modules", "layer_summary", "load_adapter", "read_adapter_config", "save_adapter",
]
