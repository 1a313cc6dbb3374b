"""BEiT-3 Multiway Transformer in plain PyTorch (no DeepSpeed inside)."""
from .attention import attention, available_backends
from .beit3 import BEiT3, BEiT3Output, Modality, Multiway
from .config import PRESETS, BEiT3Config, ConfigError, get_config
from .heads import BEiT3ForPretraining, ContrastiveHeads, MDMOutput

__all__ = [
    "attention", "available_backends", "BEiT3", "BEiT3Output", "Modality", "Multiway", "PRESETS",
    "BEiT3Config", "ConfigError", "get_config", "BEiT3ForPretraining", "ContrastiveHeads", "MDMOutput",
]
