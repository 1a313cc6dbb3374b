"""beit3.data_pipeline: shards, tokenizer, masking and the mixed, resumable pretraining loader.

Public API:
    TextTokenizer                      SentencePiece with XLM-R ids (<s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last)
    DataConfig, check_batch_arithmetic typed config; start-up check of global counts vs ranks x accumulation
    PretrainLoader, ImageLoader        per-rank micro-batches with state_dict()/load_state_dict()
    BlockMaskGenerator, mask_text      image block masking (exact count) and text masking
    CropParams, sample_crop, apply_crop  the augmentation's crop, shared with the offline-codes command
    finish_views                       flip, jitter, normalization, tokenizer view of uint8 crops (in the step)
    ShardWriter, resolve_shards, TarIndex  webdataset shards with a manifest
    (specs/manifests may be s3://, gs://, http(s):// or pipe:; remote.py, shard_cache.py: node-local cache)
CLIs: write_images, write_texts, write_pairs, write_manifest, train_spm (``python -m beit3.data_pipeline.X``).
"""
from .augment import finish_views
from .config import (AugmentConfig, BatchArithmeticError, DataConfig, DataConfigError, ImageMaskConfig,
                     TextMaskConfig, check_batch_arithmetic)
from .loader import ImageLoader, PretrainLoader
from .masking import BlockMaskGenerator, block_mask_reference, mask_text
from .samples import SkipSample
from .sequence import GlobalSampleSequence, sample_rng
from .shards import ShardWriter, TarIndex, resolve_shards
from .tokenizer import TextTokenizer
from .transforms import CropParams, apply_crop, sample_crop

__all__ = ["AugmentConfig", "BatchArithmeticError", "DataConfig", "DataConfigError", "ImageMaskConfig",
           "TextMaskConfig", "check_batch_arithmetic", "ImageLoader", "PretrainLoader", "BlockMaskGenerator",
           "block_mask_reference", "mask_text", "SkipSample", "GlobalSampleSequence", "sample_rng", "ShardWriter",
           "TarIndex", "resolve_shards", "TextTokenizer", "CropParams", "apply_crop", "sample_crop", "finish_views"]
