"""Semantic segmentation: the ADE20K layout, sliding windows, mIoU, layer decay, checkpoints, and the CLI end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_SEG_DATA, compose_cfg, run_cli
from vimexp import VimexpError
from vimexp.data.ade20k import ADE20K, ADE20KDataModule, EvalTransform, rescale_size
from vimexp.models import create_model, load_checkpoint
from vimexp.build import build_task
from vimexp.tasks.optim import param_groups
from vimexp.tasks.segmentation import slide_logits

def _write_pair(root, split, name, label, size=(20, 30)):
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size[::-1], (90, 120, 150)).save(root / "images" / split / f"{name}.jpg")
    if label is not None:
        Image.fromarray(label.astype(np.uint8)).save(root / "annotations" / split / f"{name}.png")


def test_labels_are_shifted_and_zero_is_ignored(tmp_path):
    label = np.zeros((20, 30), np.uint8)
    label[:, 10:20], label[:, 20:] = 1, 150
    _write_pair(tmp_path, "validation", "a", label)
    image, shifted = ADE20K(tmp_path, "validation", num_classes=150).load(0)
    assert shifted.dtype == np.uint8 and set(np.unique(shifted)) == {255, 0, 149}
    assert (shifted[:, :10] == 255).all() and (shifted[:, 10:20] == 0).all() and (shifted[:, 20:] == 149).all()
    img, full = EvalTransform(scale=(64, 16))(image, shifted)
    assert img.shape[-2:] == rescale_size(20, 30, (64, 16)) == (16, 24) and full.shape == (20, 30)


def test_bad_annotations_fail_in_one_line(tmp_path):
    _write_pair(tmp_path, "training", "a", np.ones((20, 30)))
    _write_pair(tmp_path, "training", "b", None)
    with pytest.raises(VimexpError, match=r"1 image\(s\) of .* have no annotation, e\.g\. .*b\.png"):
        ADE20K(tmp_path, "training")
    _write_pair(tmp_path, "training", "b", np.full((20, 30), 151))
    with pytest.raises(VimexpError, match="holds class 151 but data.num_classes=150"):
        ADE20K(tmp_path, "training", num_classes=150).load(1)
    with pytest.raises(VimexpError, match="has no images/validation"):
        ADE20K(tmp_path, "validation")


def test_training_crops_are_padded_with_ignored_labels_and_reproducible(tiny_seg_data):
    dm = ADE20KDataModule(tiny_seg_data, num_classes=10, batch_size=4, num_workers=0, crop_size=64, scale=(96, 24),
                          ratio_range=(1.0, 1.0))  # images rescaled to 24 px: smaller than the crop
    dm.setup()
    image, label = dm.train_set[(0, 0, (-1, -1))]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64)
    assert (label[24:] == 255).all() and (label[:, 24:] == 255).all() and (image[:, 24:] == 0).all()
    again = dm.train_set[(0, 0, (-1, -1))]
    assert torch.equal(image, again[0]) and not torch.equal(image, dm.train_set[(0, 1, (-1, -1))][0])


class _Pixelwise(nn.Module):  # a net whose output at a pixel depends on that pixel only: windows can't change it
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x), None


def test_sliding_windows_equal_whole_image_inference():
    torch.manual_seed(0)
    net, image = _Pixelwise(), torch.randn(1, 3, 70, 100)
    whole = net(image)[0]
    torch.testing.assert_close(slide_logits(net, image, 5, crop=48, stride=32), whole)  # overlapping windows
    torch.testing.assert_close(slide_logits(net, image[..., :40, :40], 5, crop=48, stride=32),
                               whole[..., :40, :40])  # an image smaller than the crop: padded, cut back


def test_one_window_of_the_real_model_is_the_model(tmp_path):
    cfg = compose_cfg(["experiment=builtin_seg", "data.root=/unused"], tmp_path)
    task = build_task(cfg).eval()
    image = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        whole = F.interpolate(task.model(image)[0], size=(48, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(slide_logits(task.model, image, 10, crop=48, stride=32), whole)


def test_miou_macc_aacc_match_a_hand_computed_confusion_matrix(tmp_path):
    task = build_task(compose_cfg(["experiment=builtin_seg", "data.root=/unused", "data.num_classes=4"], tmp_path))
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 3, (2, 9, 9), generator=g), torch.randint(0, 3, (2, 9, 9), generator=g)
    target[0, :3] = 255  # ignored; class 3 appears nowhere and must not count
    for metric in task.metrics.values():
        metric(pred, target)
    keep = target != 255
    confusion = np.zeros((4, 4))
    for t, p in zip(target[keep].tolist(), pred[keep].tolist()):
        confusion[t, p] += 1
    tp, gt, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    present = (gt + predicted) > 0
    miou = (tp[present] / (gt + predicted - tp)[present]).mean()
    macc = (tp[gt > 0] / gt[gt > 0]).mean()
    aacc = tp.sum() / confusion.sum()
    got = {k: m.compute().item() for k, m in task.metrics.items()}
    assert got == pytest.approx({"mIoU": miou, "mAcc": macc, "aAcc": aacc}, abs=1e-6)


def test_layer_decay_reproduces_the_official_groups_or_the_intended_ones(tmp_path):
    cfg = compose_cfg(["experiment=ade20k_upernet_vim_ti", "data.root=/unused", "++model.depth=4",
                       "task.out_indices=[0,1,2,3]"], tmp_path)
    model = build_task(cfg).model
    lr_of = lambda groups: {id(p): g["lr"] for g in groups for p in g["params"]}  # noqa: E731
    wd_of = lambda groups: {id(p): g["weight_decay"] for g in groups for p in g["params"]}  # noqa: E731
    official, intended = (param_groups(model, 1.0, 0.05, 0.9, m) for m in ("official", "intended"))
    b = model.backbone
    assert lr_of(official)[id(b.pos_embed)] == pytest.approx(0.9 ** 5)
    assert lr_of(official)[id(b.layers[0].mixer.in_proj.weight)] == 1.0  # the Mamba layers were never decayed
    assert lr_of(intended)[id(b.layers[0].mixer.in_proj.weight)] == pytest.approx(0.9 ** 4)
    assert lr_of(intended)[id(b.layers[3].mixer.in_proj.weight)] == pytest.approx(0.9)
    assert lr_of(intended)[id(model.decode_head.fuse[0].weight)] == 1.0
    assert wd_of(official)[id(b.pos_embed)] == 0.05 and wd_of(intended)[id(b.pos_embed)] == 0.0
    assert wd_of(official)[id(b.layers[0].mixer.D)] == 0.0


def test_a_middle_class_token_checkpoint_loads_into_the_backbone_without_one(tmp_path):
    source = create_model("vim_nano", img_size=32, pool="middle", kernel="torch")
    torch.save({"model": source.state_dict()}, tmp_path / "cls.pth")
    backbone = create_model("vim_nano", img_size=32, pool="mean", num_classes=0, kernel="torch")
    load_checkpoint(backbone, tmp_path / "cls.pth", ignore=("head.",))
    grid = torch.cat([source.pos_embed[:, :8], source.pos_embed[:, 9:]], 1)  # 16 patches, the class token at 8
    torch.testing.assert_close(backbone.pos_embed, grid)
    torch.testing.assert_close(backbone.layers[2].mixer.A_log, source.layers[2].mixer.A_log)


def test_cli_trains_and_records_miou_and_previews(tmp_path):
    params = ",".join(f"{k}:{v}" for k, v in TINY_SEG_DATA.items())
    run = run_cli("train", "experiment=builtin_seg", "debug=limit", f"data.root={tmp_path}/seg/ADEChallengeData2016",
                  f"data.generate_params={{{params}}}", "data.batch_size=4", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = next((tmp_path / "logs" / "debug" / "builtin_seg").iterdir())
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "segmentation" and record["epochs"] == 2
    assert set(record["best"]) == {"val/mIoU", "val/mAcc", "val/aAcc"}
    assert 0 <= record["best"]["val/mIoU"] <= 100
    assert len(list((out / "previews").glob("val_step*.png"))) == 2
    again = run_cli("eval", "experiment=builtin_seg", f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}",
                    f"data.root={tmp_path}/seg/ADEChallengeData2016", "data.num_workers=0", "trainer.accelerator=cpu",
                    "++trainer.limit_val_batches=2",  # as debug=limit validated
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    evaluated = json.loads(next((tmp_path / "logs" / "eval").rglob("results.json")).read_text())
    assert evaluated["final"]["val/mIoU"] == pytest.approx(record["best"]["val/mIoU"], abs=1e-4)


def test_upernet_vim_ti_has_the_official_parameter_count(tmp_path):
    """seg/tools/analysis_tools/vim-t-upernet.txt counts 12,901,100 parameters for the model it prints: the training
    config's (one auxiliary conv) with a 64 x 64 pos_embed, i.e. built at 1024 px."""
    cfg = compose_cfg(["experiment=ade20k_upernet_vim_ti", "data.root=/unused", "model.kernel=torch",
                       "data.crop_size=1024"], tmp_path)
    assert build_task(cfg).num_params == 12_901_100
    cfg = compose_cfg(["experiment=ade20k_upernet_vim_ti", "data.root=/unused", "model.kernel=torch"], tmp_path)
    assert build_task(cfg).num_params == 12_901_100 - (64 * 64 - 32 * 32) * 192  # 512 px: 32 x 32 rows
