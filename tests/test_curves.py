"""A run's training curves (vimexp.curves): what metrics.csv holds decides the panels; nothing in it, no figure."""
from pathlib import Path

import pytest
from PIL import Image

from vimexp import curves
from vimexp.curves import panels, plot_curves, read_metrics, steps_per_epoch, write_curves

# as build.AppendingCSVLogger writes it: the step-level loss every few steps, then per epoch the validation row and the
# epoch-level row; the last line repeats step 99, as a run resumed from a checkpoint before it does
CLASSIFICATION = "\n".join([
    "epoch,step,train/img_per_sec,train/loss_epoch,train/loss_step,train/lr,val/acc1,val/acc5,val/loss,val_ema/acc1,"
    "val_ema/acc5",
    "0,19,,,1.86,,,,,,",
    "0,39,,,1.61,,,,,,",
    "0,77,,,,,64.6,98.9,1.02,45.9,92.0",
    "0,77,16.4,1.67,,0.002,,,,,",
    "1,99,,,1.40,,,,,,",
    "1,155,,,,,71.2,99.1,0.85,60.3,95.5",
    "1,155,17.0,1.31,,0.004,,,,,",
    "1,99,,,1.18,,,,,,",
]) + "\n"


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "metrics.csv"
    path.write_text(text)
    return path


def _drop_columns(text: str, prefix: str) -> str:
    rows = [line.split(",") for line in text.splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if not name.startswith(prefix)]
    return "".join(",".join(r[i] for i in keep) + "\n" for r in rows)


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # a complete, readable PNG
        assert im.format == "PNG"
        return im.size


def test_reading_keeps_the_numbers_by_step_and_the_resumed_value_of_a_repeated_step(tmp_path):
    series = read_metrics(_csv(tmp_path, CLASSIFICATION))
    assert series["train/loss_step"] == {19: 1.86, 39: 1.61, 99: 1.18}  # step 99 twice: the resumed run's value
    assert series["val_ema/acc1"] == {77: 45.9, 155: 60.3} and series["train/lr"] == {77: 0.002, 155: 0.004}
    assert steps_per_epoch(series) == 78  # epoch 0 ended at step 77


def test_classification_with_ema_draws_loss_lr_and_top1_raw_and_ema(tmp_path):
    shown = panels(read_metrics(_csv(tmp_path, CLASSIFICATION)), "val/acc1")
    assert shown == [("loss", ["train/loss_step", "train/loss_epoch", "val/loss"]), ("learning rate", ["train/lr"]),
                     ("val/acc1 (%)", ["val/acc1", "val_ema/acc1"])]
    png = plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", "val/acc1")
    assert png == tmp_path / "curves.png" and _png(png) == (1500, 380)  # three 5 x 3.8 inch panels at 100 dpi


def test_without_ema_the_top1_panel_has_the_raw_weights_only(tmp_path):
    series = read_metrics(_csv(tmp_path, _drop_columns(CLASSIFICATION, "val_ema/")))
    assert panels(series, "val/acc1")[-1] == ("val/acc1 (%)", ["val/acc1"])
    assert _png(plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", "val/acc1")) == (1500, 380)


def test_segmentation_draws_its_loss_and_miou_and_skips_the_lr_it_does_not_log(tmp_path):
    text = "epoch,step,train/loss_step,train/loss_epoch,val/mIoU,val/mAcc\n0,9,2.1,,,\n0,19,,,31.5,40.2\n0,19,,1.9,,\n"
    series = read_metrics(_csv(tmp_path, text))
    assert panels(series, "val/mIoU") == [("loss", ["train/loss_step", "train/loss_epoch"]),
                                          ("val/mIoU (%)", ["val/mIoU"])]
    assert _png(plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", "val/mIoU")) == (1000, 380)


@pytest.mark.parametrize("text", ["epoch,step,train/img_per_sec\n0,77,16.4\n",  # none of the curves' columns
                                  "epoch,step,train/loss_step,val/acc1\n",  # a header and no rows
                                  "epoch,train/loss_step\n0,1.5\n",  # no step to place a value at
                                  ""])
def test_a_metrics_csv_with_nothing_to_draw_gives_no_figure(text, tmp_path):
    assert plot_curves(_csv(tmp_path, text), tmp_path / "curves.png", "val/acc1") is None
    assert write_curves(tmp_path, "val/acc1") is None
    assert not (tmp_path / "curves.png").exists()


def test_a_run_without_metrics_csv_gets_no_figure_and_a_drawing_failure_ends_nothing(tmp_path, monkeypatch, capsys):
    assert write_curves(tmp_path, "val/acc1") is None and not (tmp_path / "curves.png").exists()
    _csv(tmp_path, CLASSIFICATION)

    def broken(*args):
        raise RuntimeError("no display")
    monkeypatch.setattr(curves, "plot_curves", broken)
    assert write_curves(tmp_path, "val/acc1") is None
    assert "warning: no curves.png (RuntimeError: no display)" in capsys.readouterr().err
