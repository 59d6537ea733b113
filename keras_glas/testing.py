"""Synthetic instance-segmentation batches for tests and benchmarks: filled-ellipse glands on a
flat background, in the pipeline's Mask R-CNN format, with no data to download or build."""
import numpy as np


def ellipse_glands(rng, count, size, *, objects, max_instances, centre_range, radius_range,
                   background_range, gland_colour=None, noise=0.0):
    """Pipeline-format batch of filled-ellipse glands on a flat background.

    Each image gets a flat background colour, then `objects` axis-aligned filled ellipses, each
    painted only where no earlier gland lies (so glands may touch but never overlap); a gland
    that earlier ones hide entirely is left out, and the next one takes its id.

    Args:
        rng: `np.random.Generator`. Per image it draws the background colour, then per gland
            its centre (y, x), its radii (y, x) and, if `gland_colour` is None, its colour;
            the noise of the whole batch comes last.
        count: B, the number of images.
        size: S, the height and width of every image.
        objects: glands drawn per image, at most `max_instances`.
        max_instances: N, the padded length of `boxes` and `classes`.
        centre_range: (low, high) of the centre coordinates, as fractions of `size`.
        radius_range: (low, high) of the radii, as fractions of `size`.
        background_range: (low, high) of each background channel, in [0, 1].
        gland_colour: one RGB colour in [0, 1] for every gland, or None for a colour per gland
            drawn uniformly from [0.2, 0.5] per channel.
        noise: standard deviation of Gaussian noise added to every pixel (0 draws none); the
            images are clipped to [0, 1] afterwards.

    Returns:
        (x, y): x float32 (B, S, S, 3) in [0, 1]; y = {"boxes": float32 (B, N, 4) of (y0, x0,
        y1, x1) pixel boxes padded with -1, "classes": float32 (B, N), 0 for a gland and -1
        for padding, "instances": int32 (B, S, S), 0 for background and k + 1 for the gland
        of row k}.
    """
    if objects > max_instances:
        raise ValueError(f"objects ({objects}) must not exceed max_instances ({max_instances})")
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((count, size, size, 3), np.float32)
    instances = np.zeros((count, size, size), np.int32)
    boxes = -np.ones((count, max_instances, 4), np.float32)
    classes = -np.ones((count, max_instances), np.float32)
    for i in range(count):
        images[i] = rng.uniform(*background_range, 3)
        drawn = 0
        for _ in range(objects):
            cy, cx = rng.uniform(centre_range[0] * size, centre_range[1] * size, 2)
            ry, rx = rng.uniform(radius_range[0] * size, radius_range[1] * size, 2)
            inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & (instances[i] == 0)
            if not inside.any():
                continue
            instances[i][inside] = drawn + 1
            images[i][inside] = rng.uniform(0.2, 0.5, 3) if gland_colour is None else gland_colour
            ys, xs = np.nonzero(inside)
            boxes[i, drawn] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            classes[i, drawn] = 0
            drawn += 1
    if noise:
        images += rng.normal(0, noise, images.shape).astype(np.float32)
    return np.clip(images, 0, 1), {"boxes": boxes, "classes": classes, "instances": instances}
