"""Task models on the BEiT-3 backbone (layouts of the official fine-tuning heads).

Every model keeps the backbone under ``beit3.`` so that pretrained/official weights load by
prefix, and names its heads after the official release (``fc_norm``/``head``, ``pooler``,
``vision_head``/``language_head``/``logit_scale``, ``mlm_head``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from beit3.model.beit3 import BEiT3, BEiT3Output, Modality
from beit3.model.config import BEiT3Config
from beit3.model.heads import ContrastiveHeads


def _init_linear(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-std, b=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TaskModel(nn.Module):
    """Common plumbing: the backbone under ``beit3``, weight-decay exemptions, checkpointing."""

    #: parameter-name prefixes that belong to the task head (get ``head_lr_scale``)
    head_prefixes: tuple[str, ...] = ()

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.config = cfg
        self.beit3 = BEiT3(cfg)

    def no_weight_decay(self) -> set[str]:
        return {f"beit3.{n}" for n in self.beit3.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True, checkpoint_fn=None) -> None:
        self.beit3.set_grad_checkpointing(enable, checkpoint_fn)


class Pooler(nn.Module):
    """LayerNorm -> Linear(D, D) -> Tanh on the first token (official VQA/ITC pooler)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(self.norm(x[:, 0])))  # [B, D]


class ImageClassifier(TaskModel):
    """Vision encoder -> mean of patch tokens (no CLS) -> LayerNorm -> Linear (init x ``init_scale``).

    The official ImageNet head runs the backbone without its final norm
    (``normalize_output=False``); pass such a config.
    """

    head_prefixes = ("fc_norm.", "head.")

    def __init__(self, cfg: BEiT3Config, num_classes: int, init_scale: float = 1e-3) -> None:
        super().__init__(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        _init_linear(self.fc_norm, cfg.init_std)
        _init_linear(self.head, cfg.init_std)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    def forward(self, images: Tensor) -> Tensor:
        out = self.beit3(images=images)
        pooled = out.vision[:, 1:].mean(dim=1)  # [B, D]
        return self.head(self.fc_norm(pooled))  # [B, C]


class VQAModel(TaskModel):
    """Fusion encoder -> pooler(x[:, 0]) -> Linear(D, 2D) -> LN -> GELU -> Linear(2D, A)."""

    head_prefixes = ("pooler.", "head.")

    def __init__(self, cfg: BEiT3Config, num_answers: int = 3129) -> None:
        super().__init__(cfg)
        D = cfg.embed_dim
        self.pooler = Pooler(D, cfg.layer_norm_eps)
        self.head = nn.Sequential(nn.Linear(D, 2 * D), nn.LayerNorm(2 * D, eps=cfg.layer_norm_eps), nn.GELU(),
                                  nn.Linear(2 * D, num_answers))
        _init_linear(self.pooler, cfg.init_std)
        _init_linear(self.head, cfg.init_std)

    def forward(self, images: Tensor, text_ids: Tensor, text_padding_mask: Optional[Tensor] = None) -> Tensor:
        out = self.beit3(images=images, text_ids=text_ids, text_padding_mask=text_padding_mask)
        return self.head(self.pooler(out.hidden))  # [B, A]


class NLVR2Model(TaskModel):
    """Two image-text pairs per example; each gives ``cat(x[:, 0], x[:, split])``; the two
    are concatenated (4D) -> LN -> Linear(4D, 2D) -> LN -> GELU -> Linear(2D, 2)."""

    head_prefixes = ("head.",)

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__(cfg)
        D = cfg.embed_dim
        eps = cfg.layer_norm_eps
        self.head = nn.Sequential(nn.LayerNorm(4 * D, eps=eps), nn.Linear(4 * D, 2 * D),
                                  nn.LayerNorm(2 * D, eps=eps), nn.GELU(), nn.Linear(2 * D, 2))
        _init_linear(self.head, cfg.init_std)
        with torch.no_grad():  # official: both Linear layers (weight and bias) x init_scale 0.001
            for lin in (self.head[1], self.head[4]):
                lin.weight.mul_(1e-3)
                lin.bias.mul_(1e-3)

    def forward(self, images: Tensor, images2: Tensor, text_ids: Tensor,
                text_padding_mask: Optional[Tensor] = None) -> Tensor:
        B = images.shape[0]
        pad = None if text_padding_mask is None else torch.cat([text_padding_mask, text_padding_mask])
        out = self.beit3(images=torch.cat([images, images2]), text_ids=torch.cat([text_ids, text_ids]),
                         text_padding_mask=pad)  # hidden [2B, N, D]
        pair = torch.cat([out.hidden[:, 0], out.hidden[:, out.split]], dim=-1)  # [2B, 2D]
        both = torch.cat([pair[:B], pair[B:]], dim=-1)  # [B, 4D]
        return self.head(both)  # [B, 2]


class RetrievalModel(ContrastiveHeads):
    """Dual encoder: ``vision_head``/``language_head`` on the first token, L2-normalized, with
    the learnable ``logit_scale`` (names as the official ITC/retrieval checkpoints)."""

    head_prefixes = ("vision_head.", "language_head.", "logit_scale")

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__(cfg.embed_dim)
        self.config = cfg
        self.beit3 = BEiT3(cfg)
        # [1] instead of a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors
        # (official checkpoints' scalar is reshaped on load, see ``train.load_weights``)
        self.logit_scale = nn.Parameter(self.logit_scale.detach().reshape(1))
        _init_linear(self.vision_head, cfg.init_std)
        _init_linear(self.language_head, cfg.init_std)

    no_weight_decay = TaskModel.no_weight_decay
    set_grad_checkpointing = TaskModel.set_grad_checkpointing

    def image_features(self, images: Tensor) -> Tensor:
        return self.encode_vision(self.beit3(images=images))  # [B, D], unit norm

    def text_features(self, text_ids: Tensor, text_padding_mask: Optional[Tensor] = None) -> Tensor:
        return self.encode_text(self.beit3(text_ids=text_ids, text_padding_mask=text_padding_mask))  # [B, D]

    def forward(self, images: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
                text_padding_mask: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
        """Unit-norm image ``[B, D]`` and text ``[B, D]`` features and ``logit_scale`` (log of
        the inverse temperature), read inside forward so that ZeRO-3 has gathered it."""
        img = self.image_features(images) if images is not None else None
        txt = self.text_features(text_ids, text_padding_mask) if text_ids is not None else None
        return img, txt, self.logit_scale.squeeze(0)


class CaptioningModel(TaskModel):
    """Fusion encoder as a conditional generator under the captioning mask, with ``mlm_head``.

    Training predicts masked caption tokens (input ids already carry ``mask_id`` there); a
    masked token at position i sees the image and the (partly masked) text up to i.
    Generation predicts the next token at an appended mask token (see ``generation``).
    """

    head_prefixes = ("mlm_head.",)

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__(cfg)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        _init_linear(self.mlm_head, cfg.init_std)

    def forward(self, images: Tensor, text_ids: Tensor, text_padding_mask: Optional[Tensor] = None,
                masked: Optional[Tensor] = None) -> Tensor:
        """Logits ``[M, V]`` at the ``masked`` ``[B, L]`` positions (all positions if None: ``[B, L, V]``)."""
        out = self.beit3(images=images, text_ids=text_ids, text_padding_mask=text_padding_mask, causal_text=True)
        text = out.text  # [B, L, D]
        if masked is not None:
            text = text[masked.bool()]  # [M, D]
        return self.mlm_head(text)


class VisionFeatureExtractor(nn.Module):
    """Patch features of chosen blocks as maps ``[B, D, H/p, W/p]`` for a detection/segmentation
    framework (e.g. torchvision ``FeaturePyramidNetwork`` / ``MaskRCNN``, which read
    ``out_channels``). With ``pyramid=True`` the four maps are resampled to strides p/4, p/2,
    p, 2p (BEiT's deconv/identity/max-pool adapters).
    """

    def __init__(self, backbone: BEiT3, out_indices: Sequence[int] = (), pyramid: bool = False) -> None:
        super().__init__()
        cfg = backbone.config
        depth = cfg.depth
        self.backbone = backbone
        if not out_indices:
            out_indices = sorted({max(0, depth // 4 - 1), max(0, depth // 2 - 1), max(0, 3 * depth // 4 - 1),
                                  depth - 1})
        if any(not 0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {list(out_indices)} must lie in [0, {depth})")
        self.out_indices = tuple(out_indices)
        self.out_channels = cfg.embed_dim
        self.grid = cfg.grid_size
        self.pyramid: Optional[nn.ModuleList] = None
        if pyramid:
            if len(self.out_indices) != 4:
                raise ValueError("pyramid=True needs exactly 4 out_indices")
            D = cfg.embed_dim
            self.pyramid = nn.ModuleList([
                nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(),
                              nn.ConvTranspose2d(D, D, 2, 2)),
                nn.ConvTranspose2d(D, D, 2, 2),
                nn.Identity(),
                nn.MaxPool2d(2, 2),
            ])

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        x, modality, split = self.backbone.embed(images, None, None)  # [B, 1 + P, D]
        B = x.shape[0]
        feats: "OrderedDict[str, Tensor]" = OrderedDict()
        for i, block in enumerate(self.backbone.blocks):
            x = block(x, modality, split)
            if i in self.out_indices:
                fmap = x[:, 1:].transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # [B, D, g, g]
                feats[str(len(feats))] = fmap
        if self.pyramid is not None:
            feats = OrderedDict((k, op(v)) for (k, v), op in zip(feats.items(), self.pyramid))
        return feats


@torch.no_grad()
def zero_shot_class_embeddings(model: RetrievalModel, class_text_ids: list[Tensor],
                               class_padding: list[Optional[Tensor]]) -> Tensor:
    """Class embeddings ``[C, D]``: each class's prompt texts ``[T, L]`` encoded, averaged, renormalized."""
    embs = []
    for ids, pad in zip(class_text_ids, class_padding):
        e = model.text_features(ids, pad).mean(dim=0)  # [D]
        embs.append(F.normalize(e, dim=-1))
    return torch.stack(embs)  # [C, D]


@torch.no_grad()
def zero_shot_logits(model: RetrievalModel, images: Tensor, class_embeddings: Tensor) -> Tensor:
    """Cosine similarity of images to class embeddings (image-to-text retrieval): ``[B, C]``."""
    return model.image_features(images) @ class_embeddings.t()


TASK_MODELS = {"classification": ImageClassifier, "vqa": VQAModel, "nlvr2": NLVR2Model,
               "retrieval": RetrievalModel, "captioning": CaptioningModel}

__all__ = ["TaskModel", "Pooler", "ImageClassifier", "VQAModel", "NLVR2Model", "RetrievalModel",
           "CaptioningModel", "VisionFeatureExtractor", "zero_shot_class_embeddings", "zero_shot_logits",
           "TASK_MODELS", "Modality", "BEiT3Output"]
