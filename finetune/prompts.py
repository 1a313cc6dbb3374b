"""Class-name prompts for classification by image-to-text retrieval (the ``zeroshot`` task).

The BEiT-3 paper (sec. 3.2) classifies ImageNet as image-to-text retrieval: the category names
are the texts of image-text pairs and a dual encoder finds the most relevant label for an image
(its 89.6% top-1 is after fine-tuning that dual encoder, not zero-shot). Sets here
(``data.zeroshot_prompts``):

- ``names``: the class name alone (the paper's formulation);
- ``clip80``: the 80 ImageNet templates of CLIP's prompt-engineering notebook (openai/CLIP
  ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``);
- ``clip7``: the 7 of them CLIP's notebook selected as the best small subset;
- ``templates``: ``data.zeroshot_templates`` as given.

Each class's prompts are encoded, L2-normalized, averaged and renormalized (CLIP's ensemble).
"""
from __future__ import annotations

CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.',
)

CLIP_IMAGENET_SELECTED: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)

PROMPT_SETS = {"names": ("{}",), "clip80": CLIP_IMAGENET_TEMPLATES, "clip7": CLIP_IMAGENET_SELECTED}


def prompt_templates(name: str, custom: list[str]) -> list[str]:
    """The templates of set ``name`` (``templates``: ``custom``); each holds one ``{}``."""
    if name == "templates":
        return list(custom)
    if name not in PROMPT_SETS:
        raise KeyError(f"prompt set {name!r} is not one of {['templates', *PROMPT_SETS]}")
    return list(PROMPT_SETS[name])


__all__ = ["CLIP_IMAGENET_TEMPLATES", "CLIP_IMAGENET_SELECTED", "PROMPT_SETS", "prompt_templates"]
