"""loraforge: build your own LoRA fine-tuned LLM on a laptop CPU or a GPU cluster."""
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, load_adapter, save_adapter

__version__ = "0.1.0"
__all__ = ["LoraConfig", "LoraModel", "LoraforgeError", "load_adapter", "save_adapter", "__version__"]
