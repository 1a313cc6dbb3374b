"""Fused Triton attention kernels; importing this package registers the ``triton`` backend.

Raises ImportError when Triton is missing (``beit3.model.attention`` then keeps ``sdpa`` and
``math`` only). See ``flash_attention`` for the kernel and its fallbacks.
"""
from ..attention import register_backend
from .flash_attention import (MAX_HEAD_DIM, BlockConfig, compiled_mode_available, default_config,
                              flash_attention, interpreter_mode, plan, suffix_padding_lengths,
                              triton_attention, unsupported_reason)

register_backend("triton", triton_attention)

__all__ = ["BlockConfig", "default_config", "flash_attention", "triton_attention", "suffix_padding_lengths",
           "plan", "unsupported_reason", "interpreter_mode", "compiled_mode_available", "MAX_HEAD_DIM"]
