"""Keep timm's RandAugment working on current Pillow.

timm's increasing-severity Posterize ('inc1' in DeiT's 'rand-m9-mstd0.5-inc1') reaches 0 bits at high magnitude;
Pillow >= 11 rejects bits < 1, where older Pillow returned a black image. Restore that result.
"""
from PIL import Image
from timm.data import auto_augment

_posterize = auto_augment.posterize


def posterize(img, bits_to_keep, **kwargs):
    if bits_to_keep < 1:  # 0 bits kept: every channel value masked to 0
        return Image.new(img.mode, img.size)
    return _posterize(img, bits_to_keep, **kwargs)


for _name, _op in list(auto_augment.NAME_TO_OP.items()):
    if _op is _posterize:
        auto_augment.NAME_TO_OP[_name] = posterize
