"""BEiT v2 VQ-KD image tokenizer (vector-quantized knowledge distillation), plain PyTorch.

The tokenizer turns an image into one discrete visual token per patch; BEiT-3's masked image
modeling predicts these tokens at the masked patches.

- ``VisionTransformer``: the released tokenizer's ViT (q and v biases, no k bias, LayerNorm eps
  1e-6, absolute positions, patch tokens through ``fc_norm``); used as encoder (image ->
  patch features) and decoder (code map, patch size 1 -> patch features).
- ``NormEMAQuantizer``: L2-normalised codebook, nearest code by cosine, straight-through
  estimator, commitment loss, EMA codebook update (counts and sums all-reduced across ranks,
  renormalised, unused codes keep their vectors), optional cosine k-means initialisation on the
  first batch, and ``reseed_`` to re-seed dead codes.
- ``VQKD``: encoder -> ``encode_task_layer`` (fp32) -> quantizer -> decoder ->
  ``decode_task_layer`` (to the teacher's feature width); ``codes(images)`` for targets.
- Teachers for training (``ClipVisionTeacher``, ``DinoTeacher``, ``BEiT3VisionTeacher``): frozen
  feature extractors loaded from local state dicts.
- Official checkpoints: ``filter_official_state_dict``, ``config_from_state_dict``,
  ``load_tokenizer`` (our file or a released ``vqkd_encoder_base_decoder_*`` file),
  ``save_tokenizer``.

Images come in as float ``[B, 3, H, W]`` in [0, 1]; the tokenizer maps them to [-1, 1] itself.
"""
from .config import (CLIP_MEAN, CLIP_STD, FORMAT_TAG, IMAGENET_MEAN, IMAGENET_STD, OFFICIAL_DROPPED_PREFIXES, VQKD_PRESETS,
                     VQKDConfig, get_vqkd_config)
from .vit import Attention, Mlp, Block, PatchEmbed, VisionTransformer
from .quantizer import all_reduce_sum, broadcast_, kmeans_cosine, CodebookEMA, QuantizerOutput, NormEMAQuantizer
from .tokenizer import VQKDOutput, default_codes_dtype, VQKD
from .io import filter_official_state_dict, config_from_state_dict, save_tokenizer, load_tokenizer, freeze
from .teachers import ClipVisionTeacher, DinoTeacher, BEiT3VisionTeacher, FrozenTeacher, TEACHER_KINDS, build_teacher

__all__ = ['CLIP_MEAN', 'CLIP_STD', 'IMAGENET_MEAN', 'IMAGENET_STD', 'OFFICIAL_DROPPED_PREFIXES', 'FORMAT_TAG', 'VQKDConfig', 'VQKD_PRESETS', 'get_vqkd_config', 'Attention', 'Mlp', 'Block', 'PatchEmbed', 'VisionTransformer', 'all_reduce_sum', 'broadcast_', 'kmeans_cosine', 'CodebookEMA', 'QuantizerOutput', 'NormEMAQuantizer', 'VQKDOutput', 'default_codes_dtype', 'VQKD', 'filter_official_state_dict', 'config_from_state_dict', 'save_tokenizer', 'load_tokenizer', 'freeze', 'ClipVisionTeacher', 'DinoTeacher', 'BEiT3VisionTeacher', 'FrozenTeacher', 'TEACHER_KINDS', 'build_teacher']
