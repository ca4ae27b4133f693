"""timm's RandAugment on the device: the workers draw the ops, the device applies them to the uint8 batch, with
Pillow's arithmetic, so that the images equal the workers' own (`data.rand_augment_on=device`).

Why: on a 16-core H200 host the workers bound the Vim-Ti CLI, and RandAugment is about a third of a worker's time
an image (docs/optimisation.md, step 31). Measured there (experiments/results/loader/device_rand_augment/), the
workers gain 32-48% and the device's half, a histogram kernel and one kernel a layer replayed as a CUDA graph,
costs 1.7 ms of GPU time a batch of 128; the CLI's Vim-Ti keeps 87-91% of its step against 67-73% in the workers
(docs/optimisation.md, step 43). `workers` stays the default until both models are compared in one call.
The worker runs timm's own RandAugment object with each op's image function swapped for a recorder, so every
random draw (the ops, their application, magnitude and sign, the resampling filter) is timm's, in timm's order;
the record of each op travels with the image. Written by hand
because no library applies Pillow's integer and float rounding to batches: each op follows Pillow's C code
(libImaging's Geometry.c affine filters, Filter.c 3x3 kernel, Blend.c, Convert.c RGB to L; ImageOps for the
look-up tables) step for step, float32 where Pillow computes in float and float64 where it computes in double,
with no fused multiply-adds. tests/test_device_augment.py checks each op, and whole pipelines, against Pillow.

`data.resize_on=device` (with RandAugment on the device) moves the random resized crop's resize there too: the
worker cuts the crop and computes Pillow's resampling coefficients, the device runs Pillow's two fixed-point passes
in the order the installed Pillow would (see the section below).
"""
import copy
import functools
import math
import os
import random
import warnings

import numpy as np
import torch
import triton
import triton.language as tl
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import RandAugment
from torch.utils.data import default_collate
from torchvision.transforms import Compose
from torchvision.transforms.functional import pil_modes_mapping

from vimexp import VimexpError
from vimexp.data import compat

# an op's record: (code, arguments...) as float64; code 0: the op was drawn not to apply
RECORD = 10
NONE, AUTO_CONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, \
    AFFINE_BILINEAR, AFFINE_BICUBIC = range(13)
CODES = 13
_COLOR, _SHARPNESS, _AFFINE_BILINEAR, _AFFINE_BICUBIC, _NARGS = (tl.constexpr(x) for x in (
    COLOR, SHARPNESS, AFFINE_BILINEAR, AFFINE_BICUBIC, RECORD - 1))  # for the kernel
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
    records (layers, RECORD) float64. Every other transform runs as before, in the same order; with
    `resize_on_device`, the random resized crop and the flip before RandAugment are drawn, not applied, and the
    image is the crop, as DeviceResizedCrop returns it."""

    def __init__(self, transform: Compose, resize_on_device: bool = False):
        steps = list(transform.transforms)
        at = next((i for i, t in enumerate(steps) if isinstance(t, RandAugment)), None)
        if at is None:
            raise VimexpError("data.rand_augment_on=device needs RandAugment (data.auto_augment=rand-...): "
                              "set data.rand_augment_on=workers for other augmentations")
        self.before, self.after = Compose(steps[:at]), Compose(steps[at + 1:])
        self.crop = _device_crop(steps[:at], steps[at + 1:]) if resize_on_device else None
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
        if self.crop is not None:
            crop = self.crop(img)
            records = self.rand_augment_draws()
            return crop, self.erase_draws(), records
        img = self.before(img)
        records = self._record(img)
        image, boxes = self.after(img)
        return image, boxes, records

    def _record(self, img) -> torch.Tensor:
        self._records = []
        self.rand_augment(img)  # draws as timm does; each applied op appends its record
        records = torch.zeros(self.rand_augment.num_layers, RECORD, dtype=torch.float64)
        for row, record in zip(records, self._records):  # ops drawn not to apply recorded nothing: code 0
            row[:len(record)] = torch.tensor(record, dtype=torch.float64)
        return records

    # data.resize_on=device: the draws after the crop need only the resized image's size, not its pixels
    def rand_augment_draws(self, _=None) -> torch.Tensor:
        return self._record(Image.new("RGB", self.crop.size[::-1]))

    def erase_draws(self, _=None) -> torch.Tensor:
        return self.after(torch.empty(3, *self.crop.size, dtype=torch.uint8))[1]


def _device_crop(before: list, after: list):
    """DeviceResizedCrop for DeiT's steps around RandAugment: a random resized crop and a flip before it, the
    conversion to a tensor and the erase boxes after it (which draw from the image's size only)."""
    names = [type(t).__name__ for t in before]
    crop_and_flip = ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    if names not in (crop_and_flip[:1], crop_and_flip) \
            or any(type(t).__name__ not in ("MaybePILToTensor", "EraseBoxes") for t in after):
        raise VimexpError(f"data.resize_on=device needs timm's random resized crop and flip before RandAugment, not "
                          f"{names}: set data.resize_on=workers")
    return DeviceResizedCrop(*before)


# ---- the device's half: the records applied, with Pillow's arithmetic ----

def apply_records(images: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) uint8; records (B, layers, RECORD) on their device. Layer by layer, every image's op in
    one launch: the point ops as a look-up table a channel (built for the whole batch), colour, sharpness and the
    affine ops in the kernel. Shapes never depend on the draws, so the host never waits for the device."""
    if not images.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise VimexpError("data.rand_augment_on=device needs a CUDA device: set data.rand_augment_on=workers")
    images = images.contiguous()  # the kernel's layout
    n, _, h, w = images.shape
    block = _block(images, BLOCK)
    side, centre = (float(np.float32(x) / np.float32(13)) for x in (1, 5))  # SMOOTH's weights, float32
    for layer in range(records.shape[1]):
        codes, args = records[:, layer, 0], records[:, layer, 1:].contiguous()
        tables = _lookup_tables(images, codes, args)
        out = torch.empty_like(images)
        _apply_layer[(n, triton.cdiv(h * w, block))](
            images, out, codes.to(torch.int32), args, tables, side, centre, h, w, BLOCK=block,
            enable_fp_fusion=False)  # Pillow rounds each product and sum
        images = out
    return images


class GraphedRecords:
    """apply_records, captured as a CUDA graph a batch shape (eagerly on a CPU): its small launches cost the host
    4.9 ms a batch of 128 against the device's 1.7 (H200), and the host also enqueues the model step.
    The result is the graph's own buffer, valid until the next call: the normalisation copies it at once. A capture
    that fails says so once and leaves the batches to eager launches."""

    def __init__(self):
        self.graphs, self.eager = {}, False

    def __call__(self, images: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
        if not images.is_cuda or self.eager:
            return apply_records(images, records)
        key = (tuple(images.shape), tuple(records.shape), images.device)
        if key not in self.graphs:
            stream = torch.cuda.current_stream(images.device)
            try:
                self.graphs[key] = self._capture(images, records)
            except RuntimeError as e:
                torch.cuda.set_stream(stream)  # a failed capture's exit leaves its own stream current
                warnings.warn(f"data.rand_augment_on=device: capturing RandAugment's device half as a CUDA graph "
                              f"failed ({type(e).__name__}: {str(e)[:200]}); it runs eagerly, about 5 ms more host "
                              "time a batch of 128")
                self.eager = True
                return apply_records(images, records)
        graph, (static_images, static_records), out = self.graphs[key]
        static_images.copy_(images)
        static_records.copy_(records)
        graph.replay()
        return out

    @staticmethod
    def _capture(images, records):
        static = images.contiguous().clone(), records.clone()
        warm_up = torch.cuda.Stream(images.device)
        warm_up.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(warm_up):  # compiles the kernels and warms the allocator, as capture requires
            apply_records(*static)
        torch.cuda.current_stream(images.device).wait_stream(warm_up)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread keeps calling CUDA meanwhile; only this thread's calls count
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = apply_records(*static)
        return graph, static, out


BLOCK = 1024  # output pixels a program (all three channels)
HIST_BLOCK = 4096  # pixels a program of the histograms


def _block(x: torch.Tensor, on_gpu: int) -> int:
    """Pixels a program: `on_gpu`, or in Triton's interpreter a whole image (a program costs it far more)."""
    return on_gpu if x.is_cuda else triton.next_power_of_2(x.shape[2] * x.shape[3])


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """Each image's histograms of red, green, blue and grey (Convert.c's L): (B, 4, 256) int64. The statistics of
    every point op (each channel's range, equalize's table, the mean grey level) follow from them."""
    n, _, h, w = x.shape
    block = _block(x, HIST_BLOCK)
    programs = triton.cdiv(h * w, block)
    hist = torch.zeros(n, 4, 256, dtype=torch.int32, device=x.device)
    _histogram_kernel[(n, programs)](x, hist, h * w, BLOCK=block)
    hist = hist.long()
    hist[:, :, 0] -= programs * block - h * w  # the padding lanes, counted as black
    return hist


def _lookup_tables(x: torch.Tensor, codes: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Each image's point op as a table a channel, (B, 3, 256) uint8 (the identity for the other ops): each op's
    arithmetic applied to the values 0..255 as a one-row image, with the statistics of the image itself."""
    n, _, h, w = x.shape
    hist = _histograms(x)
    present = hist[:, :3] > 0
    lo = present.int().argmax(2)  # each channel's lowest and highest value
    hi = 255 - present.flip(2).int().argmax(2)
    grey_mean = (hist[:, 3] * torch.arange(256, device=x.device)).sum(1).double() / _exact(h * w, x)
    v = torch.arange(256, device=x.device, dtype=torch.uint8).expand(n, 3, 1, 256)
    tables = {
        AUTO_CONTRAST: _auto_contrast(v, lo[:, :, None, None], hi[:, :, None, None]),
        EQUALIZE: _equalize(hist[:, :3], hi, h * w), INVERT: 255 - v, POSTERIZE: _posterize(v, a),
        SOLARIZE: _solarize(v, a), SOLARIZE_ADD: _solarize_add(v, a), CONTRAST: _contrast(v, a, grey_mean),
        BRIGHTNESS: _brightness(v, a),
    }
    out = v
    for code, table in tables.items():
        out = torch.where(_each(codes == code), table, out)
    return out.reshape(n, 3, 256).contiguous()


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


def _auto_contrast(x, lo, hi):  # ImageOps.autocontrast, cutoff 0: each channel's range (lo, hi) stretched to 0..255
    scale = _exact(255.0, x) / (hi.double() - lo.double())
    offset = -lo.double() * scale
    out = torch.trunc(x.double() * scale + offset).clamp(0, 255)
    return torch.where(hi > lo, out.nan_to_num(0).to(torch.uint8), x)


def _equalize(hist, hi, pixels):  # ImageOps.equalize: each channel's table from its histogram, (n, c, 1, 256)
    last = hist.gather(2, hi[:, :, None])  # the count of the highest value present
    step = (pixels - last) // 255
    lut = (step // 2 + hist.cumsum(2) - hist) // step.clamp(min=1)
    identity = ((hist > 0).sum(2, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, torch.arange(256, device=hist.device), lut).clamp(0, 255)
    return lut.to(torch.uint8)[:, :, None]


def _blend(degenerate, image, factor):
    """Blend.c: degenerate + alpha * (image - degenerate) in float32, clipped to 0..255 and truncated."""
    alpha = _each(factor.float())
    degenerate = degenerate.float()
    return (degenerate + alpha * (image.float() - degenerate)).clamp(0, 255).to(torch.uint8)


def _contrast(v, a, grey_mean):  # the degenerate image: the grey level's mean, rounded half up
    return _blend(_each(torch.floor(grey_mean + 0.5)).expand_as(v), v, a[:, 0])


def _brightness(v, a):
    return _blend(torch.zeros_like(v), v, a[:, 0])


@triton.jit
def _histogram_kernel(SRC, HIST, hw, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < hw
    img = SRC + b * 3 * hw
    r = tl.load(img + p, mask=ok, other=0).to(tl.int32)
    g = tl.load(img + hw + p, mask=ok, other=0).to(tl.int32)
    bl = tl.load(img + 2 * hw + p, mask=ok, other=0).to(tl.int32)
    grey = (r * 19595 + g * 38470 + bl * 7471 + 0x8000) >> 16  # Convert.c's RGB -> L, 16-bit fixed point
    bins = tl.arange(0, 256)
    out = HIST + b * 1024 + bins
    tl.atomic_add(out, tl.histogram(r, 256))
    tl.atomic_add(out + 256, tl.histogram(g, 256))
    tl.atomic_add(out + 512, tl.histogram(bl, 256))
    tl.atomic_add(out + 768, tl.histogram(grey, 256))


# Colour, sharpness and the affine ops read other pixels than their own: a kernel, one program a tile of an image,
# that branches on the image's op. Float32 where Pillow computes in float, float64 where it computes in double.

@triton.jit
def _blend_tl(degenerate, image, alpha):  # Blend.c, as _blend
    return tl.minimum(tl.maximum(degenerate + alpha * (image - degenerate), 0.0), 255.0).to(tl.uint8)


@triton.jit
def _tap(img, at, ok, offset):  # the pixel `offset` away, each channel, float32
    return tl.load(img + at + offset, mask=ok, other=0).to(tl.float32)


@triton.jit
def _cubic(v1, v2, v3, v4, d):  # Geometry.c's BICUBIC, in its order of operations
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


@triton.jit
def _source(img, channel, ok, row, col, H, W):  # a source pixel, edges repeated, float64
    row = tl.minimum(tl.maximum(row, 0), H - 1)
    col = tl.minimum(tl.maximum(col, 0), W - 1)
    return tl.load(img + channel + (row * W + col)[None, :], mask=ok, other=0).to(tl.float64)


@triton.jit
def _affine_row(img, channel, ok, row, x0, dx, H, W, CUBIC: tl.constexpr):
    if CUBIC:
        return _cubic(_source(img, channel, ok, row, x0 - 1, H, W), _source(img, channel, ok, row, x0, H, W),
                      _source(img, channel, ok, row, x0 + 1, H, W), _source(img, channel, ok, row, x0 + 2, H, W), dx)
    else:
        v0 = _source(img, channel, ok, row, x0, H, W)
        return v0 + (_source(img, channel, ok, row, x0 + 1, H, W) - v0) * dx


@triton.jit
def _affine(img, channel, ok, args, c, p, H, W, CUBIC: tl.constexpr):
    """Image.transform(AFFINE) with Geometry.c's bilinear or bicubic filter (edge pixels repeated); output pixels
    whose source falls outside the image keep the fill colour."""
    xs = (p % W).to(tl.float64) + 0.5
    ys = (p // W).to(tl.float64) + 0.5
    xin = tl.load(args) * xs + tl.load(args + 1) * ys + tl.load(args + 2)
    yin = tl.load(args + 3) * xs + tl.load(args + 4) * ys + tl.load(args + 5)
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = tl.floor(xin), tl.floor(yin)
    dx, dy = (xin - x0)[None, :], (yin - y0)[None, :]
    x0, y0 = x0.to(tl.int32), y0.to(tl.int32)
    if CUBIC:
        v = _cubic(_affine_row(img, channel, ok, y0 - 1, x0, dx, H, W, CUBIC),
                   _affine_row(img, channel, ok, y0, x0, dx, H, W, CUBIC),
                   _affine_row(img, channel, ok, y0 + 1, x0, dx, H, W, CUBIC),
                   _affine_row(img, channel, ok, y0 + 2, x0, dx, H, W, CUBIC), dy)
    else:
        r0 = _affine_row(img, channel, ok, y0, x0, dx, H, W, CUBIC)
        v = r0 + (_affine_row(img, channel, ok, y0 + 1, x0, dx, H, W, CUBIC) - r0) * dy
    fill = tl.load(args + 6 + c, mask=c < 3, other=0).to(tl.uint8)
    out = tl.minimum(tl.maximum(v, 0.0), 255.0).to(tl.uint8)
    return tl.where(inside[None, :], out, fill[:, None])


@triton.jit
def _apply_layer(SRC, DST, CODE, ARGS, TABLES, side, centre, H, W, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # output pixels
    c = tl.arange(0, 4)  # channels, padded to a power of two
    hw = H * W
    ok = (c < 3)[:, None] & (p < hw)[None, :]
    img = SRC + b * 3 * hw
    channel = c[:, None] * hw
    at = channel + p[None, :]
    v = tl.load(img + at, mask=ok, other=0)
    code = tl.load(CODE + b)
    args = ARGS + b * _NARGS
    alpha = tl.load(args).to(tl.float32)
    if code == _COLOR:  # blended with the grey image (Convert.c's 16-bit fixed-point weights)
        weights = tl.where(c == 0, 19595, tl.where(c == 1, 38470, tl.where(c == 2, 7471, 0)))
        grey = (tl.sum(v.to(tl.int32) * weights[:, None], axis=0) + 0x8000) >> 16
        out = _blend_tl(grey.to(tl.float32)[None, :], v.to(tl.float32), alpha)
    elif code == _SHARPNESS:  # blended with ImageFilter.SMOOTH (Filter.c: float32, rows y+1 to y-1, border copied)
        y, x = p // W, p % W
        inner = ok & ((y > 0) & (y < H - 1) & (x > 0) & (x < W - 1))[None, :]
        ss = 0.5 + ((_tap(img, at, inner, W - 1) * side + _tap(img, at, inner, W) * side)
                    + _tap(img, at, inner, W + 1) * side)
        ss = ss + ((_tap(img, at, inner, -1) * side + _tap(img, at, inner, 0) * centre)
                   + _tap(img, at, inner, 1) * side)
        ss = ss + ((_tap(img, at, inner, -W - 1) * side + _tap(img, at, inner, -W) * side)
                   + _tap(img, at, inner, -W + 1) * side)
        smooth = tl.where(inner, tl.minimum(tl.maximum(ss, 0.0), 255.0).to(tl.uint8), v)
        out = _blend_tl(smooth.to(tl.float32), v.to(tl.float32), alpha)
    elif code == _AFFINE_BILINEAR:
        out = _affine(img, channel, ok, args, c, p, H, W, CUBIC=False)
    elif code == _AFFINE_BICUBIC:
        out = _affine(img, channel, ok, args, c, p, H, W, CUBIC=True)
    else:  # a point op (or none): its table
        out = tl.load(TABLES + b * 768 + c[:, None] * 256 + v.to(tl.int32), mask=ok, other=0)
    tl.store(DST + b * 3 * hw + at, out, mask=ok)


# ---- the random resized crop's resize on the device (data.resize_on=device) ----
# The worker draws the crop, its filter and the flip as timm does, and ships the crop's pixels with Pillow's
# coefficients for resizing it; the device resizes with Pillow's fixed-point arithmetic (Resample.c: one pass along
# each axis, the first rounded to uint8), then flips. Why: the resize is about a third of a worker's time an image
# once RandAugment is on the device (docs/optimisation.md, steps 42-43), and no library resizes a batch of crops of
# different sizes as Pillow does.

PRECISION_BITS = 22  # Resample.c: 32 bits less 8 a channel less 2 of headroom
# Pillow 13 runs the vertical pass first when the height shrinks by more than twice what the width does
PILLOW_PICKS_ORDER = int(Image.__version__.split(".")[0]) >= 13
PASS = 8  # a pass's row a crop: source offset, source width, first source row, out rows, out columns, out offset,
#           axis (0: along rows, 1: along columns), flip
_PASS = tl.constexpr(PASS)


def _bicubic(x):  # Resample.c's bicubic_filter (a = -0.5), in its order of operations
    x = np.abs(x)
    return np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))


def _bilinear(x):
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {Image.Resampling.BICUBIC: (2.0, _bicubic), Image.Resampling.BILINEAR: (1.0, _bilinear)}


@functools.lru_cache(maxsize=8192)  # a worker meets each crop side again and again
def resize_coefficients(in_size: int, out_size: int, resample) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's coefficients for one axis of resizing a whole image (precompute_coeffs, normalize_coeffs_8bpc):
    (out_size, 2) rows of (first source pixel, count) and (out_size, taps) weights in fixed point, int32, read-only
    (cached)."""
    if resample not in _FILTERS:
        raise VimexpError(f"data.resize_on=device resizes bicubic or bilinear, not {resample}: "
                          "set data.resize_on=workers")
    support, kernel = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): toward zero
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    x = np.arange(taps)
    w = np.where(x < count[:, None], kernel(((x + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for column in w.T:  # summed in Pillow's order
        total = total + column
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << PRECISION_BITS)).astype(np.int32)
    bounds = np.stack([first, count], 1).astype(np.int32)
    bounds.flags.writeable = fixed.flags.writeable = False
    return bounds, fixed


class DeviceResizedCrop:
    """The worker's half of timm's RandomResizedCropAndInterpolation and the flip after it: the same draws, in the
    same order, and no pixel work beyond the crop. Returns ((crop pixels (h, w, 3) uint8, first pass, second pass),
    flip) for `collate_crops`; `size` is the resized image's (height, width)."""

    def __init__(self, crop, flip=None):
        self.crop, self.flip, self.size = crop, flip, tuple(crop.size)

    def __call__(self, img):
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        mode = self.crop.interpolation
        mode = random.choice(mode) if isinstance(mode, (tuple, list)) else mode
        flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)
        img = img if img.mode == "RGB" else img.convert("RGB")  # the loader's images are RGB already: no copy
        pixels = np.asarray(img.crop((left, top, left + w, top + h)))
        return (pixels, *resize_passes(h, w, self.size, pil_modes_mapping[mode])), flip


def resize_passes(h: int, w: int, size: tuple[int, int], resample) -> tuple[tuple, tuple]:
    """Pillow's two passes resizing (h, w) to size (height, width), in its order, each as (axis: 0 along rows,
    1 along columns; first source row it reads; its output's rows and columns; bounds; weights)."""
    rows, row_weights = resize_coefficients(h, size[0], resample)
    cols, col_weights = resize_coefficients(w, size[1], resample)
    if PILLOW_PICKS_ORDER and 0 < h - size[0] and h - size[0] > 2 * (w - size[1]):
        return (1, 0, size[0], w, rows, row_weights), (0, 0, size[0], size[1], cols, col_weights)
    first, last = int(rows[0, 0]), int(rows[-1, 0] + rows[-1, 1])  # the horizontal pass keeps the rows used
    shifted = np.stack([rows[:, 0] - first, rows[:, 1]], 1)
    return (0, first, last - first, size[1], cols, col_weights), (1, 0, size[0], size[1], shifted, row_weights)


def collate_crops(samples):
    """torch's default collate, but for the training crops, whose sizes differ: their pixels end to end, and for
    each pass a PASS row a crop and its coefficients (padded to the batch's most), with the sizes the launches
    need. A training sample is ((crop, boxes, records), target), the crop as DeviceResizedCrop returns it; other
    samples go to torch's collate."""
    if not (isinstance(samples[0][0], (tuple, list)) and isinstance(samples[0][0][0], tuple)):
        return default_collate(samples)
    crops = [s[0][0] for s in samples]
    (boxes, records), targets = default_collate([(s[0][1:], s[1]) for s in samples])
    meta, at, between = ([], []), 0, 0
    for (pixels, first, second), flip in crops:
        meta[0].append([at, pixels.shape[1], *first[1:4], between, first[0], 0])
        meta[1].append([between, first[3], *second[1:4], 0, second[0], flip])
        at += pixels.size
        between += first[2] * first[3] * 3
    batch = {"pixels": torch.from_numpy(np.concatenate([c[0][0].reshape(-1) for c in crops])), "between": between,
             "most": max(m[3] * m[4] for m in meta[0])}  # the in-between size, a first pass's most outputs
    for p in (0, 1):
        batch[f"meta{p}"] = torch.tensor(meta[p], dtype=torch.int64)
        batch[f"bounds{p}"] = _padded([c[0][1 + p][4] for c in crops])
        batch[f"weights{p}"] = _padded([c[0][1 + p][5] for c in crops])
    return [batch, boxes, records], targets


def _padded(arrays: list) -> torch.Tensor:
    """2-d int32 arrays stacked, zero-padded to the largest (np.pad's overhead cost as much as the rest of a batch)."""
    out = np.zeros((len(arrays), max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)), np.int32)
    for slot, a in zip(out, arrays):
        slot[:a.shape[0], :a.shape[1]] = a
    return torch.from_numpy(out)


def resize_crops(crops: dict, size: tuple[int, int]) -> torch.Tensor:
    """The collated crops resized to `size` (height, width) and flipped where drawn: (B, 3, height, width) uint8,
    Pillow's pixels. Two launches, their grids from host-side sizes: the host never waits for the device."""
    pixels = crops["pixels"]
    if not pixels.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise VimexpError("data.resize_on=device needs a CUDA device: set data.resize_on=workers")
    n, (height, width) = crops["meta0"].shape[0], size
    between = torch.empty(crops["between"], dtype=torch.uint8, device=pixels.device)
    out = torch.empty(n, 3, height, width, dtype=torch.uint8, device=pixels.device)
    for p, src, dst, most in ((0, pixels, between, crops["most"]), (1, between, out, height * width)):
        block = BLOCK if pixels.is_cuda else triton.next_power_of_2(most)
        bounds, weights = crops[f"bounds{p}"], crops[f"weights{p}"]
        _resize_pass[(n, triton.cdiv(most, block))](
            src, dst, crops[f"meta{p}"], bounds, weights, bounds.shape[1], weights.shape[2], height, width,
            FINAL=p == 1, BLOCK=block)
    return out


@triton.jit
def _clip8(v):  # Resample.c's clip8: the fixed-point sum's integer part, clamped
    return tl.minimum(tl.maximum(v >> 22, 0), 255).to(tl.uint8)


@triton.jit
def _resize_pass(SRC, DST, META, BOUNDS, WEIGHTS, lines, taps, height, width, FINAL: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One pass of each crop along its axis (its PASS row): into uint8 (rows, columns, 3) at its offset, or
    (FINAL) into DST (B, 3, height, width), flipped where drawn."""
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = META + b * _PASS
    src_at, src_cols, first, rows = tl.load(m), tl.load(m + 1), tl.load(m + 2), tl.load(m + 3)
    cols, dst_at, axis, flip = tl.load(m + 4), tl.load(m + 5), tl.load(m + 6), tl.load(m + 7)
    ok = i < rows * cols
    row, col = i // cols, i % cols
    j = tl.where(axis == 0, col, row)  # the output position along the axis: its coefficients' row
    start = tl.load(BOUNDS + (b * lines + j) * 2, mask=ok, other=0)
    count = tl.load(BOUNDS + (b * lines + j) * 2 + 1, mask=ok, other=0)
    at = src_at + tl.where(axis == 0, (first + row) * src_cols + start, (first + start) * src_cols + col) * 3
    step = tl.where(axis == 0, 3, src_cols * 3)
    red = tl.full([BLOCK], 1 << 21, tl.int32)
    green, blue = red, red
    for t in range(0, taps):
        use = ok & (t < count)
        k = tl.load(WEIGHTS + (b * lines + j) * taps + t, mask=use, other=0)
        p = at + t * step
        red += tl.load(SRC + p, mask=use, other=0).to(tl.int32) * k
        green += tl.load(SRC + p + 1, mask=use, other=0).to(tl.int32) * k
        blue += tl.load(SRC + p + 2, mask=use, other=0).to(tl.int32) * k
    if FINAL:
        plane = height * width
        out = b.to(tl.int64) * 3 * plane + row * width + tl.where(flip != 0, width - 1 - col, col)
        tl.store(DST + out, _clip8(red), mask=ok)
        tl.store(DST + out + plane, _clip8(green), mask=ok)
        tl.store(DST + out + 2 * plane, _clip8(blue), mask=ok)
    else:
        out = dst_at + i.to(tl.int64) * 3
        tl.store(DST + out, _clip8(red), mask=ok)
        tl.store(DST + out + 1, _clip8(green), mask=ok)
        tl.store(DST + out + 2, _clip8(blue), mask=ok)
