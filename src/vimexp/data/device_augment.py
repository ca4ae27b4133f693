"""timm's RandAugment on the device: the workers draw the ops, the device applies them to the uint8 batch, with
Pillow's arithmetic, so that the images equal the workers' own (`data.rand_augment_on=device`).

Why: on a 16-core H200 host the workers bound the Vim-Ti CLI, and RandAugment is about a third of a worker's time
an image (docs/optimisation.md, step 31). Measured there, the workers gain 32% but the device's half costs 14.7 ms a
batch of 128 in many small kernels, so the CLI is slower today and `workers` stays the default
(experiments/results/loader/device_rand_augment/). The worker runs timm's own RandAugment object with each op's image
function swapped for a recorder, so every random draw (the ops, their application, magnitude and sign, the
resampling filter) is timm's, in timm's order; the record of each op travels with the image. Written by hand
because no library applies Pillow's integer and float rounding to batches: each op follows Pillow's C code
(libImaging's Geometry.c affine filters, Filter.c 3x3 kernel, Blend.c, Convert.c RGB to L; ImageOps for the
look-up tables) step for step, float32 where Pillow computes in float and float64 where it computes in double,
with no fused multiply-adds. tests/test_device_augment.py checks each op, and whole pipelines, against Pillow.
"""
import copy
import math

import torch
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import RandAugment
from torchvision.transforms import Compose

from vimexp import VimexpError
from vimexp.data import compat

# an op's record: (code, arguments...) as float64; code 0: the op was drawn not to apply
RECORD = 10
NONE, AUTO_CONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, \
    AFFINE_BILINEAR, AFFINE_BICUBIC = range(13)
CODES = 13
_AFFINE = {Image.Resampling.BILINEAR: AFFINE_BILINEAR, Image.Resampling.BICUBIC: AFFINE_BICUBIC}


# ---- the worker's half: timm's draws, recorded ----

def _rotation(img, degrees):
    """Pillow's Image.rotate as an affine matrix (no centre, translation or expansion, as timm calls it)."""
    angle = degrees % 360.0
    if angle == 0:
        return None
    w, h = img.size
    angle = -math.radians(angle)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = w / 2, h / 2
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return m


def _affine_record(matrix, kwargs):
    kwargs = dict(kwargs)
    timm_aa._check_args_tf(kwargs)  # timm's own draw of the filter when it is a random choice
    if matrix is None:
        return [NONE]
    resample = kwargs["resample"]
    if resample not in _AFFINE:
        raise VimexpError(f"data.rand_augment_on=device applies bilinear and bicubic affine ops, not {resample!r}: "
                          "set data.interpolation=bicubic, bilinear or random, or data.rand_augment_on=workers")
    fill = kwargs.get("fillcolor") or 0
    fill = tuple(fill) if isinstance(fill, (tuple, list)) else (fill,) * 3
    return [_AFFINE[resample], *matrix, *fill]


def _lut_op(code):
    return lambda img, *args, **_: [code, *args]


# timm's image functions -> their records (the same arguments, computed by timm's level functions)
_RECORDERS = {
    timm_aa.auto_contrast: _lut_op(AUTO_CONTRAST),
    timm_aa.equalize: _lut_op(EQUALIZE),
    timm_aa.invert: _lut_op(INVERT),
    timm_aa.posterize: _lut_op(POSTERIZE),
    compat.posterize: _lut_op(POSTERIZE),
    timm_aa.solarize: _lut_op(SOLARIZE),
    timm_aa.solarize_add: lambda img, add, thresh=128, **_: [SOLARIZE_ADD, add, thresh],
    timm_aa.color: _lut_op(COLOR),
    timm_aa.contrast: _lut_op(CONTRAST),
    timm_aa.brightness: _lut_op(BRIGHTNESS),
    timm_aa.sharpness: _lut_op(SHARPNESS),
    timm_aa.desaturate: lambda img, factor, **_: [COLOR, min(1.0, max(0.0, 1.0 - factor))],
    timm_aa.shear_x: lambda img, f, **kw: _affine_record([1, f, 0, 0, 1, 0], kw),
    timm_aa.shear_y: lambda img, f, **kw: _affine_record([1, 0, 0, f, 1, 0], kw),
    timm_aa.translate_x_rel: lambda img, pct, **kw: _affine_record([1, 0, pct * img.size[0], 0, 1, 0], kw),
    timm_aa.translate_y_rel: lambda img, pct, **kw: _affine_record([1, 0, 0, 0, 1, pct * img.size[1]], kw),
    timm_aa.translate_x_abs: lambda img, px, **kw: _affine_record([1, 0, px, 0, 1, 0], kw),
    timm_aa.translate_y_abs: lambda img, px, **kw: _affine_record([1, 0, 0, 0, 1, px], kw),
    timm_aa.rotate: lambda img, degrees, **kw: _affine_record(_rotation(img, degrees), kw),
}


class RecordedRandAugment:
    """The train transform with timm's RandAugment recorded, not applied: image -> (image, erase boxes, records),
    records (layers, RECORD) float64. Every other transform runs as before, in the same order."""

    def __init__(self, transform: Compose):
        steps = list(transform.transforms)
        at = next((i for i, t in enumerate(steps) if isinstance(t, RandAugment)), None)
        if at is None:
            raise VimexpError("data.rand_augment_on=device needs RandAugment (data.auto_augment=rand-...): "
                              "set data.rand_augment_on=workers for other augmentations")
        self.before, self.after = Compose(steps[:at]), Compose(steps[at + 1:])
        self.rand_augment = copy.copy(steps[at])
        self.rand_augment.ops = [self._recording(op) for op in self.rand_augment.ops]
        self._records = []

    def _recording(self, op):
        recorder = _RECORDERS.get(op.aug_fn)
        if recorder is None:
            raise VimexpError(f"data.rand_augment_on=device has no device version of RandAugment's {op.name}: "
                              "set data.rand_augment_on=workers")
        op = copy.copy(op)

        def record(img, *args, **kwargs):
            self._records.append(recorder(img, *args, **kwargs))
            return img
        op.aug_fn = record
        return op

    def __call__(self, img):
        img = self.before(img)
        self._records = []
        img = self.rand_augment(img)  # draws as timm does; each applied op appends its record
        records = torch.zeros(self.rand_augment.num_layers, RECORD, dtype=torch.float64)
        for row, record in zip(records, self._records):  # ops drawn not to apply recorded nothing: code 0
            row[:len(record)] = torch.tensor(record, dtype=torch.float64)
        image, boxes = self.after(img)
        return image, boxes, records


def layer_counts(records: torch.Tensor) -> list[list[int]]:
    """Images a code in each layer, read on the host before the transfer (the device then never syncs)."""
    codes = records[:, :, 0].long()
    return [torch.bincount(codes[:, layer], minlength=CODES).tolist() for layer in range(codes.shape[1])]


# ---- the device's half: the records applied, with Pillow's arithmetic ----

def apply_records(images: torch.Tensor, records: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """images (B, 3, H, W) uint8; records (B, layers, RECORD) on their device; counts from `layer_counts`.
    Records are applied in order (layer 0 on every image, then layer 1 ...) in groups of one op each."""
    for layer, per_code in enumerate(counts):
        order = torch.argsort(records[:, layer, 0], stable=True)  # images sorted by code, as bincount counts them
        start = per_code[NONE]
        for code in range(1, CODES):
            if per_code[code]:
                index = order[start:start + per_code[code]]
                images[index] = _OPS[code](images[index], records[index, layer, 1:])
                start += per_code[code]
    return images


def _each(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def _exact(value, like, dtype=torch.float64) -> torch.Tensor:
    """A number as a tensor on `like`'s device: torch divides a number by a tensor, and on CUDA a tensor by a
    number, through a reciprocal, which rounds differently from Pillow's division. Filled there, not copied
    (a copy from the host would wait for the device)."""
    return torch.full((), value, dtype=dtype, device=like.device)


def _posterize(x, a):
    keep = a[:, 0].clamp(0, 8).long()  # 0 bits: a black image (as vimexp.data.compat restores)
    mask = 255 - ((torch.ones_like(keep) << (8 - keep)) - 1)
    return x & _each(mask).to(torch.uint8)


def _solarize(x, a):
    return torch.where(x < _each(a[:, 0]), x, 255 - x)


def _solarize_add(x, a):
    added = (x.int() + _each(a[:, 0]).int()).clamp(max=255).to(torch.uint8)
    return torch.where(x < _each(a[:, 1]), added, x)


def _auto_contrast(x, a):  # ImageOps.autocontrast, cutoff 0: each channel's range stretched to 0..255
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    scale = _exact(255.0, x) / (hi.double() - lo.double())
    offset = -lo.double() * scale
    out = torch.trunc(x.double() * scale + offset).clamp(0, 255)
    return torch.where(hi > lo, out.nan_to_num(0).to(torch.uint8), x)


def _equalize(x, a):  # ImageOps.equalize: each channel's look-up table from its histogram
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = hist.gather(1, flat.amax(1, keepdim=True))  # the count of the highest value present
    step = (h * w - last) // 255
    lut = (step // 2 + hist.cumsum(1) - hist) // step.clamp(min=1)
    identity = ((hist > 0).sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, torch.arange(256, device=x.device), lut).clamp(0, 255)
    return lut.gather(1, flat).to(torch.uint8).reshape(n, c, h, w)


def _grey(x):  # Convert.c's RGB -> L: ITU-R 601-2 weights in 16-bit fixed point
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[:, None]


def _blend(degenerate, image, factor):
    """Blend.c: degenerate + alpha * (image - degenerate) in float32, clipped to 0..255 and truncated."""
    alpha = _each(factor.float())
    degenerate = degenerate.float()
    return (degenerate + alpha * (image.float() - degenerate)).clamp(0, 255).to(torch.uint8)


def _color(x, a):
    return _blend(_grey(x).expand_as(x), x, a[:, 0])


def _contrast(x, a):  # the degenerate image: the grey level's mean, rounded half up
    mean = _grey(x).sum(dim=(1, 2, 3), dtype=torch.float64) / _exact(x.shape[2] * x.shape[3], x)
    return _blend(_each(torch.floor(mean + 0.5)).expand_as(x), x, a[:, 0])


def _brightness(x, a):
    return _blend(torch.zeros_like(x), x, a[:, 0])


def _sharpness(x, a):
    """ImageFilter.SMOOTH (3x3, weights 1 and centre 5, over 13; Filter.c: float32, rows summed from y+1 to y-1,
    +0.5 and truncated; the border copied) as the degenerate image."""
    f = x.float()
    side, centre = (_exact(w, x, torch.float32) / _exact(13.0, x, torch.float32) for w in (1.0, 5.0))

    def row(r, middle):  # Filter.c's KERNEL1x3 over the interior columns
        return (r[..., :-2] * side + r[..., 1:-1] * middle) + r[..., 2:] * side
    ss = _exact(0.5, x, torch.float32) + row(f[:, :, 2:], side)
    ss = ss + row(f[:, :, 1:-1], centre)
    ss = ss + row(f[:, :, :-2], side)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = ss.clamp(0, 255).to(torch.uint8)
    return _blend(smooth, x, a[:, 0])


def _cubic(v1, v2, v3, v4, d):  # Geometry.c's BICUBIC, in its order of operations
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _affine(x, a, cubic):
    """Image.transform(AFFINE) with Geometry.c's bilinear or bicubic filter (float64, edge pixels repeated);
    output pixels whose source falls outside the image keep the fill colour."""
    n, c, h, w = x.shape
    m = [a[:, i, None, None] for i in range(6)]  # (n, 1, 1)
    xs = torch.arange(w, dtype=torch.float64, device=x.device) + 0.5
    ys = (torch.arange(h, dtype=torch.float64, device=x.device) + 0.5)[:, None]
    xin = m[0] * xs + m[1] * ys + m[2]
    yin = m[3] * xs + m[4] * ys + m[5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(xin), torch.floor(yin)
    dx, dy = (xin - x0)[:, None], (yin - y0)[:, None]  # (n, 1, h, w)
    x0, y0 = x0.long(), y0.long()
    flat = x.reshape(n, c, h * w)
    taps = range(-1, 3) if cubic else range(2)

    def at(row, col):
        index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).reshape(n, 1, h * w).expand(n, c, h * w)
        return flat.gather(2, index).reshape(n, c, h, w).double()

    rows = []
    for i in taps:
        v = [at(y0 + i, x0 + j) for j in taps]
        rows.append(_cubic(*v, dx) if cubic else v[0] + (v[1] - v[0]) * dx)
    v = _cubic(*rows, dy) if cubic else rows[0] + (rows[1] - rows[0]) * dy
    out = v.clamp(0, 255).to(torch.uint8)
    fill = a[:, 6:9].to(torch.uint8)[:, :, None, None].expand_as(out)
    return torch.where(inside[:, None], out, fill)


_OPS = {
    AUTO_CONTRAST: _auto_contrast, EQUALIZE: _equalize, INVERT: lambda x, a: 255 - x, POSTERIZE: _posterize,
    SOLARIZE: _solarize, SOLARIZE_ADD: _solarize_add, COLOR: _color, CONTRAST: _contrast, BRIGHTNESS: _brightness,
    SHARPNESS: _sharpness, AFFINE_BILINEAR: lambda x, a: _affine(x, a, cubic=False),
    AFFINE_BICUBIC: lambda x, a: _affine(x, a, cubic=True),
}
