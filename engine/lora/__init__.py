"""Multi-LoRA serving (S-LoRA tiers, Punica batching): see engine.lora.manager."""

from engine.lora.config import AdapterSpec, LoRAConfig
from engine.lora.manager import LoRAManager
from engine.lora.peft_format import AdapterError

__all__ = ["AdapterError", "AdapterSpec", "LoRAConfig", "LoRAManager"]
