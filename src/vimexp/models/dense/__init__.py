"""Dense-prediction models on a plain backbone: feature pyramids, segmentation heads, Cascade Mask R-CNN."""
