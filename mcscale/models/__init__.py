"""Networks: backbones, BYOL, the two-head clustering model, global-batch BatchNorm, K-means init."""
