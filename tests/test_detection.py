"""COCO detection: loading (polygons, RLE, crowds), box coding, the cascade's per-stage assignment, COCO AP, a model
that learns, and bad input."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection import _utils as det_utils

from conftest import run_cli
from vimexp import VimexpError
from vimexp.data.coco import CocoDataModule, CocoDetection, EvalTransform, coco_results, collate
from vimexp.models import create_model
from vimexp.models.checkpoint import adapt_pos_embed, check_compatible
from vimexp.models.dense.cascade import CascadeMaskRCNN, CascadeStage
from vimexp.models.dense.necks import ViTDetPyramid
from vimexp.tasks.optim import multistep_with_warmup

STAGE_WEIGHTS = ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15))


def write_coco(root: Path, annotations: list[dict], images=({"id": 1, "file_name": "a.jpg", "height": 20, "width": 30},),
               split="val2017") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(root / split / img["file_name"])
    cats = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]  # non-contiguous ids, as COCO's
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": list(images), "annotations": annotations, "categories": cats}))
    return root


def test_polygon_rle_and_crowd_annotations_load_as_masks(tmp_path):
    crowd = np.zeros((20, 30), np.uint8)
    crowd[10:15, 20:25] = 1  # column-major run lengths, as COCO stores crowds
    runs, flat, value, count = [], crowd.flatten(order="F"), 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    rle = {"size": [20, 30], "counts": runs}
    from pycocotools import mask as mask_utils
    compressed = mask_utils.encode(np.asfortranarray(crowd))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 6, 4], "area": 24, "iscrowd": 0,
         "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]},  # a polygon: the rectangle x 2..8, y 3..7
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 10, 5, 5], "area": 25, "iscrowd": 0,
         "segmentation": {"size": [20, 30], "counts": compressed["counts"].decode()}},  # compressed RLE
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [20, 10, 5, 5], "area": 25, "iscrowd": 1,
         "segmentation": rle}]  # a crowd, uncompressed RLE: scored as "ignore" by COCOeval, never a training target
    dataset = CocoDetection(write_coco(tmp_path, anns), "val2017")
    assert dataset.cat_ids == [3, 7]
    image, target = dataset.load(0)
    assert target["labels"].tolist() == [2, 1]  # category 7 -> 2, 3 -> 1: contiguous in id order, 0 is background
    assert target["boxes"].tolist() == [[2, 3, 8, 7], [20, 10, 25, 15]]
    polygon, from_rle = target["masks"].numpy()
    assert 16 <= polygon.sum() <= 35 and polygon[4:7, 3:8].all() and not polygon[10:].any()
    assert np.array_equal(from_rle, crowd)
    assert np.array_equal(dataset.coco.annToMask(dataset.coco.anns[3]), crowd)  # the crowd's RLE decodes the same


def test_training_pipeline_keeps_boxes_labels_and_masks_together(tiny_det_data):
    dm = CocoDataModule(tiny_det_data, num_classes=10, batch_size=4, num_workers=0, size=64)
    dm.setup("fit")
    for i in range(40):  # large-scale jitter crops objects away; what is left must still agree
        image, target = dm.train_set[(i % len(dm.train_set), i, (-1, -1))]
        n = len(target["boxes"])
        assert image.shape == (3, 64, 64) and target["labels"].shape == (n,) and target["masks"].shape == (n, 64, 64)
        if n:
            assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all() and target["boxes"].max() <= 64
            ys, xs = torch.where(target["masks"][0].bool())
            box = target["boxes"][0]  # the mask lies in its box
            assert xs.min() >= box[0] - 1 and xs.max() < box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() < box[3] + 1


def test_eval_transform_fits_the_long_side_and_records_the_scale():
    image = Image.new("RGB", (200, 100))
    tensor, target = EvalTransform(size=64)(image, {"image_id": 5})
    assert tensor.shape == (3, 64, 64) and target["image_size"] == (32, 64) and target["scale"] == 64 / 200
    assert target["orig_size"] == (100, 200)


@pytest.mark.parametrize("weights", STAGE_WEIGHTS)
def test_box_coding_round_trips(weights):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 500
    proposals = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g, dtype=torch.float64) * 300], 1)
    gt = proposals + torch.randn(50, 4, generator=g, dtype=torch.float64) * 10
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    coder = det_utils.BoxCoder(weights)
    deltas = coder.encode_single(gt, proposals)
    assert torch.allclose(coder.decode_single(deltas, proposals), gt, atol=1e-9)
    # the weights scale the targets: a stage with twice the weights sees deltas twice as large
    assert torch.allclose(det_utils.BoxCoder(tuple(2 * w for w in weights)).encode_single(gt, proposals), 2 * deltas)


def _box_at_iou(gt: torch.Tensor, iou: float) -> torch.Tensor:
    """A box of gt's height, shifted right so that its IoU with gt is exactly `iou`."""
    w = gt[2] - gt[0]
    shift = w * (1 - iou) / (1 + iou)
    return gt + torch.tensor([shift, 0, shift, 0])


def test_each_cascade_stage_assigns_foreground_at_its_own_iou():
    gt = torch.tensor([10.0, 10.0, 110.0, 60.0])
    ious = [0.45, 0.55, 0.65, 0.75]
    proposals = torch.stack([_box_at_iou(gt, i) for i in ious])
    targets = [{"boxes": gt[None], "labels": torch.tensor([4])}]
    expected = {0.5: [0, 4, 4, 4], 0.6: [0, 0, 4, 4], 0.7: [0, 0, 0, 4]}
    for iou, weights in zip((0.5, 0.6, 0.7), STAGE_WEIGHTS):
        stage = CascadeStage(8, num_classes=5, iou=iou, weights=weights, convs=1, fc_dim=8)
        matched, labels = stage.assign([proposals], targets)
        assert labels[0].tolist() == expected[iou]
        assert matched[0].tolist() == [0 if lab else -1 for lab in expected[iou]]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    assert stage.assign([proposals], empty)[1][0].tolist() == [0, 0, 0, 0]  # no objects: all background


def _perfect(coco) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in coco.anns.values()]


def test_coco_ap_of_perfect_predictions_is_100_and_drops_when_shuffled(tiny_det_data):
    coco = CocoDetection(tiny_det_data, "train2017").coco
    perfect = _perfect(coco)
    for iou_type in ("bbox", "segm"):
        assert coco_results(coco, perfect, iou_type)["AP"] == pytest.approx(100.0)
    rng = random.Random(0)
    boxes = [d["bbox"] for d in perfect]
    rng.shuffle(boxes)  # every box to some other object
    shuffled = [{**d, "bbox": b} for d, b in zip(perfect, boxes)]
    assert coco_results(coco, shuffled, "bbox")["AP"] < 50
    wrong_class = [{**d, "category_id": d["category_id"] % 10 + 1} for d in perfect]
    assert coco_results(coco, wrong_class, "bbox")["AP"] == pytest.approx(0.0)
    scored = coco_results(coco, perfect, "bbox")
    assert "APl" not in scored  # no object of the 64 px scenes is large: COCOeval has nothing to score there
    assert coco_results(coco, [], "bbox") == {k: 0.0 for k in scored}  # no detections: 0 where there was something


def test_vitdet_pyramid_levels():
    maps = ViTDetPyramid(embed_dim=48, channels=16)(torch.randn(2, 48, 8, 8))
    assert list(maps) == ["p2", "p3", "p4", "p5", "p6"]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert {m.shape[1] for m in maps.values()} == {16}


def test_deit_vitdet_loads_a_classification_deit_with_pos_embed_on_its_grid():
    deit = create_model("deit_ti", num_classes=0)
    det = create_model("deit_ti_vitdet", img_size=320)
    sd = adapt_pos_embed(det, {k: v for k, v in deit.state_dict().items()})
    check_compatible(det, sd)
    det.load_state_dict(sd)
    grid = deit.pos_embed[0, 1:].reshape(14, 14, -1)  # the class token's row is gone, the patch grid resampled
    assert det.pos_embed.shape == (1, 20, 20, 192)
    assert torch.allclose(det.pos_embed[0].mean((0, 1)), grid.mean((0, 1)), atol=0.02)
    blocks = det.blocks
    assert [b.window_size for b in blocks] == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]


def test_warmup_multistep_schedule():
    f = lambda s: multistep_with_warmup(s, [100, 150], warmup=10, warmup_ratio=1e-3)  # noqa: E731
    assert f(0) == pytest.approx(1e-3) and f(5) == pytest.approx(0.5005) and f(10) == 1.0
    assert f(99) == 1.0 and f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.01)


def test_cascade_mask_rcnn_learns_a_batch(tiny_det_data):
    """A few AdamW steps on one batch (one image without objects): every loss term is finite and the total falls;
    evaluation then gives boxes, scores, labels and mask probabilities for each image."""
    torch.manual_seed(0)
    dm = CocoDataModule(tiny_det_data, num_classes=10, batch_size=4, num_workers=0, size=64)
    dm.setup("fit")
    images, targets = collate([dm.train_set[(i, 0, (-1, -1))] for i in range(4)])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    targets[3] = {**targets[3], **empty}  # large-scale jitter can crop every object away
    backbone = create_model("vim_nano", img_size=64, embed_dim=24, depth=2, num_classes=0, pool="mean", kernel="torch")
    model = CascadeMaskRCNN(backbone, 10, channels=16, anchor_sizes=(8, 16, 32, 64, 128), fc_dim=32,
                            roi_per_image=32, rpn_pre_nms=(200, 200), rpn_post_nms=(50, 50))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(12):
        losses = model(images, targets)
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_mask",
                               *(f"loss_{k}_{i}" for k in ("cls", "box") for i in range(3))}
        assert all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert totals[-1] < 0.6 * totals[0]
    model.eval()
    detections = model(images, targets)
    assert len(detections) == 4
    for d in detections:
        n = len(d["boxes"])
        assert d["scores"].shape == (n,) and d["labels"].shape == (n,) and d["masks"].shape == (n, 1, 28, 28)
        assert n <= 100 and (d["labels"] >= 1).all() and (d["labels"] <= 10).all()


def test_missing_image_and_degenerate_box_fail_in_one_line(tmp_path, tiny_det_data):
    good = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 6, 4], "area": 24, "iscrowd": 0,
            "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]}
    write_coco(tmp_path / "a", [good])
    (tmp_path / "a" / "val2017" / "a.jpg").unlink()
    with pytest.raises(VimexpError, match="missing from .*val2017, e.g. a.jpg"):
        CocoDetection(tmp_path / "a", "val2017")
    write_coco(tmp_path / "b", [{**good, "image_id": 9}])
    with pytest.raises(VimexpError, match="annotation 1 points at image 9"):
        CocoDetection(tmp_path / "b", "val2017")
    write_coco(tmp_path / "c", [good, {**good, "id": 2, "bbox": [5, 5, 0, 3]}])
    with pytest.raises(VimexpError, match=r"annotation 2 \(image 1\) has a degenerate box \[5, 5, 0, 3\]"):
        CocoDetection(tmp_path / "c", "val2017")
    skipped = CocoDetection(tmp_path / "c", "val2017", skip_degenerate=True)
    assert len(skipped.load(0)[1]["boxes"]) == 1
    # through the CLI: one line, exit status 2, naming the fix
    write_coco(tmp_path / "d", [good, {**good, "id": 2, "bbox": [5, 5, -1, 3]}], split="train2017")
    write_coco(tmp_path / "d", [good], split="val2017")
    out = run_cli("train", "experiment=builtin_det", "debug=fdr", f"data.root={tmp_path / 'd'}",
                  "data.generate=false", "data.num_classes=2", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "data.skip_degenerate=true" in out.stderr
    out = run_cli("train", "experiment=builtin_det", "debug=fdr", f"data.root={tmp_path / 'nowhere'}",
                  "data.generate=false", cwd=tmp_path)
    assert out.returncode == 2 and "has no annotations/instances_val2017.json" in out.stderr
