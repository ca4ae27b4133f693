"""The official dense-task settings behind Tables 2 and 3 (docs/official_impl.md §4.5): each is the default of the
experiments that reproduce them, its alternative one override away, and each behaves as the official code did."""
import colorsys
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from PIL import Image

from conftest import compose_cfg, det_data_overrides
from vimexp import VimexpError
from vimexp.build import build_datamodule, build_task, build_trainer
from vimexp.data.ade20k import MMSegPhotometric, TrainTransform as SegTrainTransform
from vimexp.data.coco import TrainTransform as DetTrainTransform
from vimexp.models import create_model
from vimexp.tasks.optim import no_decay_names, param_groups
from vimexp.tasks.segmentation import seg_loss

SMALL_SEG = ["data.root=/unused", "++model.depth=4", "task.out_indices=[0,1,2,3]", "model.kernel=torch"]
SMALL_DET = ["data.root=/unused", "++model.depth=2", "data.size=64", "model.kernel=torch"]


def _cfg(tmp_path, experiment, *overrides):
    return compose_cfg([f"experiment={experiment}", *overrides], tmp_path)


# ----- features tapped: the mixer output (official Vim-Ti UperNet) or the residual stream

def _block_outputs(model, x):
    """Each block's (mixer output, residual) as it returns them, in patch order."""
    outs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o)) for k, layer in
             enumerate(model.layers)]
    model.forward_intermediates(x, indices=[0], intermediates_only=True)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("rope", [False, True])
def test_hidden_features_are_each_blocks_mixer_output(rope):
    torch.manual_seed(0)
    model = create_model("vim_nano", img_size=32, pool="mean", num_classes=0, kernel="torch", rope=rope,
                         rope_residual=rope).eval()
    x = torch.randn(2, 3, 32, 32)
    outs = _block_outputs(model, x)
    to_map = lambda t: t.transpose(1, 2).reshape(2, -1, 4, 4)  # noqa: E731  (32 px / 8 px patches)
    hidden = model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True, feature="hidden")
    for k, got in enumerate(hidden):  # taken before the next layer's RoPE turns it, as the official code does
        torch.testing.assert_close(got, to_map(outs[k][0]))
    last = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]  # default: residual + hidden
    torch.testing.assert_close(last, to_map(outs[3][0] + outs[3][1]))
    with pytest.raises(VimexpError, match="unknown feature 'residual'"):
        model.forward_intermediates(x, indices=[0], intermediates_only=True, feature="residual")


def test_each_experiment_taps_its_official_features(tmp_path):
    expected = {"ade20k_upernet_vim_ti": "hidden", "ade20k_segmenter_vim_ti": "hidden",
                "ade20k_upernet_vim_s": "residual_plus_hidden", "ade20k_upernet_deit_ti": None,
                "ade20k_upernet_deit_s": None}
    for experiment, feature in expected.items():
        assert _cfg(tmp_path, experiment, "data.root=/unused").task.feature == feature, experiment
    task = build_task(_cfg(tmp_path, "ade20k_upernet_vim_ti", *SMALL_SEG, "data.crop_size=64")).eval()
    x, seen = torch.randn(1, 3, 64, 64), []
    task.model.neck.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    task(x)
    want = task.model.backbone.forward_intermediates(x, [0, 1, 2, 3], intermediates_only=True, feature="hidden")
    for got, ref in zip(seen[0], want):
        torch.testing.assert_close(got, ref)
    other = build_task(_cfg(tmp_path, "ade20k_upernet_vim_ti", *SMALL_SEG, "task.feature=residual_plus_hidden"))
    assert other.model.feature == "residual_plus_hidden"
    with pytest.raises(VimexpError, match="task.feature=hidden needs a backbone"):
        build_task(_cfg(tmp_path, "ade20k_upernet_deit_ti", "data.root=/unused", "task.feature=hidden"))


# ----- the auxiliary FCN head: one conv

def test_aux_head_has_one_conv_and_two_one_override_away(tmp_path):
    one = build_task(_cfg(tmp_path, "ade20k_upernet_vim_ti", *SMALL_SEG)).model.aux_head
    two = build_task(_cfg(tmp_path, "ade20k_upernet_vim_ti", *SMALL_SEG, "task.aux_convs=2")).model.aux_head
    assert len(one.convs) == 1 and len(two.convs) == 2
    assert one.convs[0][0].in_channels == 192 and one.convs[0][0].out_channels == 256


# ----- MMSeg's PhotoMetricDistortion

def _reference_photometric(img: np.ndarray, p: dict) -> np.ndarray:
    """MMSeg's steps on float64 RGB in [0, 255], HSV through Python's colorsys, pixel by pixel."""
    img = img.astype(np.float64)
    if p["brightness"] is not None:
        img = np.clip(img + p["brightness"], 0, 255)
    if p["contrast_first"] and p["contrast"] is not None:
        img = np.clip(img * p["contrast"], 0, 255)
    for step in ("saturation", "hue"):
        if p[step] is None:
            continue
        out = np.empty_like(img)
        for y, x in np.ndindex(img.shape[1:]):
            h, s, v = colorsys.rgb_to_hsv(*(img[:, y, x] / 255))
            if step == "saturation":
                s = min(s * p["saturation"], 1.0)
            else:
                h = (h + 2 * p["hue"] / 360) % 1.0  # OpenCV's hue units are 2 degrees
            out[:, y, x] = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255
        img = out
    if not p["contrast_first"] and p["contrast"] is not None:
        img = np.clip(img * p["contrast"], 0, 255)
    return img


def test_mmseg_photometric_distortion_matches_a_float64_reference():
    gen = np.random.default_rng(0)
    img = torch.from_numpy(gen.integers(0, 256, (3, 6, 7), dtype=np.uint8))
    img[:, 0, 0] = torch.tensor([40, 40, 40], dtype=torch.uint8)  # a grey pixel: no hue, no saturation
    transform, rng, seen = MMSegPhotometric(), random.Random(0), set()
    for _ in range(40):
        p = transform.sample(rng)
        seen |= {(k, p[k] is not None) for k in ("brightness", "contrast", "saturation", "hue")}
        seen.add(("contrast_first", p["contrast_first"]))
        assert p["brightness"] is None or -32 <= p["brightness"] <= 32
        assert p["hue"] is None or (isinstance(p["hue"], int) and -18 <= p["hue"] < 18)
        got = transform.apply(img, p)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), _reference_photometric(img.numpy(), p), atol=2e-3, rtol=0)
    assert len(seen) == 10  # every step both applied and skipped, both orders of contrast


def test_photometric_distortion_is_mmsegs_by_default_torchvisions_one_override_away(tmp_path):
    assert _cfg(tmp_path, "ade20k_upernet_vim_ti", "data.root=/unused").data.photometric == "mmseg"
    assert isinstance(SegTrainTransform().photometric, MMSegPhotometric)
    tv = SegTrainTransform(photometric="torchvision").photometric
    assert type(tv).__name__ == "RandomPhotometricDistort"
    with pytest.raises(VimexpError, match="unknown data.photometric 'cv2'"):
        SegTrainTransform(photometric="cv2")


# ----- SyncBN in the pyramid and heads under DDP

def test_seg_experiments_sync_batchnorm_under_ddp(tmp_path):
    for experiment in ("ade20k_upernet_vim_ti", "ade20k_upernet_vim_s", "ade20k_upernet_deit_ti",
                       "ade20k_upernet_deit_s"):
        assert _cfg(tmp_path, experiment, "data.root=/unused").trainer.sync_batchnorm is True, experiment
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    cfg = _cfg(tmp_path, "ade20k_upernet_vim_ti", *SMALL_SEG, *ddp)
    layer_sync = build_trainer(cfg).strategy._layer_sync  # what Lightning's DDP applies to the module in setup
    assert isinstance(layer_sync, TorchSyncBatchNorm)
    task = build_task(cfg)
    norms = [m for m in task.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 14  # pyramid 1, PPM 4 + 1, laterals 3, FPN 3, fusion 1, auxiliary 1
    converted = layer_sync.apply(task)
    assert [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [nn.SyncBatchNorm] * 14
    assert build_trainer(_cfg(tmp_path, "ade20k_upernet_vim_ti", *SMALL_SEG, *ddp,
                              "trainer.sync_batchnorm=false")).strategy._layer_sync is None


def test_detection_has_no_batchnorm_to_sync(tmp_path):
    """The official det configs norm the pyramid and heads with LayerNorm: SyncBN has nothing to act on there."""
    task = build_task(_cfg(tmp_path, "coco_cascade_vim_ti", *SMALL_DET))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in task.modules())


# ----- divide_out: unset (False) in the Vim-S seg and Vim-Ti det configs

def test_divide_out_follows_the_official_configs(tmp_path):
    expected = {"ade20k_upernet_vim_ti": True, "ade20k_upernet_vim_s": False}
    for experiment, divide in expected.items():
        task = build_task(_cfg(tmp_path, experiment, *SMALL_SEG))
        assert {layer.mixer.divide_out for layer in task.model.backbone.layers} == {divide}, experiment
    det = build_task(_cfg(tmp_path, "coco_cascade_vim_ti", *SMALL_DET))
    assert {layer.mixer.divide_out for layer in det.model.backbone.layers} == {False}
    back = build_task(_cfg(tmp_path, "coco_cascade_vim_ti", *SMALL_DET, "model.divide_out=true"))
    assert {layer.mixer.divide_out for layer in back.model.backbone.layers} == {True}


# ----- detection weight decay: detectron2's groups

def test_detection_weight_decay_exempts_only_torch_norms_and_pos_embed(tmp_path):
    cfg = _cfg(tmp_path, "coco_cascade_vim_ti", *SMALL_DET)
    assert cfg.optimizer.wd_exempt == "detectron2"
    vim = build_task(cfg).model
    # Vim's RMSNorm and the LayerNorm2d of the pyramid and heads are no torch norm class (detectron2's own LN isn't):
    # everything else, biases, D and dt biases included, decays
    assert no_decay_names(vim, "detectron2", "intended") == {"backbone.pos_embed"}
    timm = no_decay_names(vim, "timm", "intended")
    assert {"backbone.pos_embed", "backbone.layers.0.mixer.D", "backbone.layers.0.norm.weight",
            "backbone.layers.1.mixer.dt_proj_b.bias", "neck.project.0.1.weight", "rpn.head.cls_logits.bias"} <= timm
    assert "backbone.layers.0.mixer.A_log" not in timm  # 2-d: decayed by both
    deit = build_task(_cfg(tmp_path, "coco_cascade_deit_ti", *SMALL_DET[:1], "data.size=64")).model
    exempt = no_decay_names(deit, "detectron2", "intended")
    norms = {f"backbone.blocks.{i}.norm{j}.{w}" for i in range(12) for j in (1, 2) for w in ("weight", "bias")}
    assert exempt == norms | {"backbone.pos_embed"}
    groups = param_groups(vim, 1.0, 0.1, 0.837, "intended", "detectron2")
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(vim.backbone.pos_embed)] == 0.0 and wd[id(vim.backbone.layers[0].mixer.D)] == 0.1
    assert _cfg(tmp_path, "coco_cascade_vim_ti", *SMALL_DET, "optimizer.wd_exempt=timm").optimizer.wd_exempt == "timm"
    with pytest.raises(VimexpError, match="unknown optimizer.wd_exempt 'all'"):
        no_decay_names(vim, "all", "intended")


# ----- DeiT-Ti ViTDet layer decay: 0.7, inherited from ViTDet-B

def test_deit_ti_detection_layer_decay_is_the_inherited_0_7(tmp_path):
    cfg = _cfg(tmp_path, "coco_cascade_deit_ti", "data.root=/unused", "data.size=64")
    assert cfg.optimizer.layer_decay == 0.7
    model = build_task(cfg).model
    lr = {id(p): g["lr"] for g in param_groups(model, 1.0, 0.1, 0.7, "intended", "detectron2") for p in g["params"]}
    b = model.backbone
    assert lr[id(b.patch_embed.proj.weight)] == pytest.approx(0.7 ** 13)  # detectron2: embeddings id 0 of 12 + 1
    assert lr[id(b.blocks[0].attn.qkv.weight)] == pytest.approx(0.7 ** 12)
    assert lr[id(b.blocks[11].mlp.fc2.weight)] == pytest.approx(0.7)
    assert lr[id(model.rpn.head.conv[0][0].weight)] == 1.0
    assert _cfg(tmp_path, "coco_cascade_deit_ti", "data.root=/unused",
                "optimizer.layer_decay=0.837").optimizer.layer_decay == 0.837


# ----- fp16 mixed precision for detection

def test_detection_trains_in_fp16_with_a_grad_scaler(tmp_path, tiny_det_data):
    for experiment in ("coco_cascade_vim_ti", "coco_cascade_deit_ti"):
        assert _cfg(tmp_path, experiment, "data.root=/unused").trainer.precision == "16-mixed"
        assert _cfg(tmp_path, experiment, "data.root=/unused",
                    "trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"
    cfg = _cfg(tmp_path, "builtin_det", *det_data_overrides(tiny_det_data), "data.num_workers=0",
               "model.kernel=torch", "trainer.precision=16-mixed")
    task, dm = build_task(cfg).train(), build_datamodule(cfg)
    dm.setup("fit")
    images, targets = dm.collate_fn([dm.train_set[(i, 0, (-1, -1))] for i in range(4)])
    opt, scaler = torch.optim.AdamW(task.parameters(), 1e-3), torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in task.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):  # what Lightning's 16-mixed does on a GPU, scaler included
        losses = task.model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    scaler.scale(sum(losses.values())).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 16  # no overflow: the step was taken
    assert sum(not torch.equal(a, p) for a, p in zip(before, task.parameters())) > 0.9 * len(before)


# ----- the segmentation loss: MMSeg's avg_non_ignore=False

def test_seg_loss_divides_by_every_pixel_unless_avg_non_ignore(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[[0, 1, 2, 3, 255], [255, 255, 1, 1, 0], [2, 2, 255, 3, 3]],
                           [[255] * 5, [0, 0, 0, 0, 0], [1, 255, 3, 255, 2]]])
    total, count = 0.0, 0
    for b, y, x in np.ndindex(*labels.shape):
        if labels[b, y, x] != 255:
            column = logits[b, :, y, x]
            total += float(torch.logsumexp(column, 0) - column[labels[b, y, x]])
            count += 1
    assert count == 19
    assert seg_loss(logits, labels).item() == pytest.approx(total / labels.numel(), rel=1e-12)  # 30 pixels
    assert seg_loss(logits, labels, avg_non_ignore=True).item() == pytest.approx(total / count, rel=1e-12)
    cfg = _cfg(tmp_path, "ade20k_upernet_vim_ti", *SMALL_SEG, "data.crop_size=64")
    assert cfg.task.loss_avg_non_ignore is False
    task = build_task(cfg)
    images, labels = torch.randn(2, 3, 64, 64), torch.full((2, 64, 64), 255)
    labels[:, :16, :16] = 3
    with torch.no_grad():  # the same dropout and drop-path draws for both
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="self.log"):  # no Trainer to log to
            loss = task.training_step((images, labels), 0)
        torch.manual_seed(0)
        logits, aux = task.model(images)
    up = lambda t: F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    want = sum(w * F.cross_entropy(up(t), labels, ignore_index=255, reduction="sum") / labels.numel()
               for w, t in ((1.0, logits), (0.4, aux)))
    torch.testing.assert_close(loss, want)


# ----- LSJ padding: bottom-right, zeros after normalising

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _tiny_sample(h=10, w=8):
    image = Image.new("RGB", (w, h), (200, 100, 50))
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[0, 2:6, 1:5] = 1
    return image, {"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]]), "labels": torch.tensor([3]), "masks": mask,
                   "image_id": 7}


def test_lsj_pads_bottom_right_with_zeros_after_normalising(tmp_path):
    assert _cfg(tmp_path, "coco_cascade_vim_ti", "data.root=/unused").data.lsj_pad == "bottom_right"
    transform = DetTrainTransform(size=16, scale_range=(0.5, 0.5), flip=0.0)  # 10 x 8 -> 8 x 6.4: no crop
    torch.manual_seed(0)
    image, target = transform(*_tiny_sample())
    h, w = target["image_size"]
    assert image.shape == (3, 16, 16) and (h, w) == (8, 6)
    colour = (torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(image[:, :h, :w], colour.expand(3, h, w), atol=2e-2, rtol=0)  # antialiasing at edges
    assert (image[:, h:] == 0).all() and (image[:, :, w:] == 0).all()  # padding = the mean colour
    assert target["masks"].shape == (1, 16, 16) and not target["masks"][:, h:].any() and \
        not target["masks"][:, :, w:].any()
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.75, 1.6, 3.75, 4.8]]))  # x 6/8, y 8/10
    black = DetTrainTransform(size=16, scale_range=(0.5, 0.5), flip=0.0, pad="random_black")
    image, target = black(*_tiny_sample())
    assert target["image_size"] == (16, 16)
    assert torch.isclose(image, (0 - MEAN) / STD).all(0).sum() == 16 * 16 - 8 * 6  # black, the image somewhere


def test_lsj_crop_offset_is_one_fraction_of_the_slack_on_both_axes():
    transform = DetTrainTransform(size=16, scale_range=(2.0, 2.0), flip=0.0)  # 10 x 8 -> 32 x 25
    _, target = _tiny_sample()
    ramp = np.zeros((10, 8, 3), np.uint8)  # red grows to the right, green downwards: every crop is different
    ramp[..., 0], ramp[..., 1] = np.arange(8) * 30, np.arange(10)[:, None] * 25
    gradient = Image.fromarray(ramp)
    random.seed(3)
    u = random.random()
    random.seed(3)
    out, target = transform(gradient, target)
    assert target["image_size"] == (16, 16)
    full = transform.jitter(torch.from_numpy(np.array(gradient)).permute(2, 0, 1))
    assert full.shape[-2:] == (32, 25)
    top, left = round((32 - 16) * u), round((25 - 16) * u)
    torch.testing.assert_close(out, (full[:, top:top + 16, left:left + 16].float() / 255 - MEAN) / STD)
