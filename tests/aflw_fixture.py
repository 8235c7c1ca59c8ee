"""A tiny AFLW release in the real IMM ``aflw_release-2`` on-disk layout (SPEC §D.2), for tests.

Images are small non-square RGB "faces" (a skin-coloured ellipse with dark eye, nose and mouth
dots at the keypoints) so that a network can learn something in end-to-end tests.
"""
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

# Mean keypoint positions as fractions of (width, height): left eye, right eye, nose, mouth corners.
FACE_LAYOUT = np.array([[0.32, 0.38], [0.68, 0.38], [0.50, 0.56], [0.36, 0.74], [0.64, 0.74]])


def make_aflw_release(root, n_train=40, n_test=12, seed=0):
    """Write ``root/aflw_release-2`` with ``n_train`` + ``n_test`` JPEG crops; return that folder."""
    release = Path(root) / "aflw_release-2"
    rng = np.random.default_rng(seed)
    for split, count, first_id in (("train", n_train, 2), ("test", n_test, 50000)):
        paths, keypoints, sizes = [], [], []
        for k in range(count):
            relative = f"{k % 3}/image{first_id + k:05d}_{rng.integers(10000, 99999)}.jpg"
            xy, size = _write_face(release / "output" / relative, rng)
            paths.append(relative)
            keypoints.append(xy[:, ::-1])         # stored (y, x) as in the release
            sizes.append((size[1], size[0]))      # hw = (height, width)
        (release / f"aflw_{split}_images.txt").write_text("".join(p + "\n" for p in paths))
        scipy.io.savemat(release / f"aflw_{split}_keypoints.mat",
                         {"gt": np.array(keypoints, dtype=np.float64).reshape(count, 5, 2),
                          "hw": np.array(sizes, dtype=np.float64).reshape(count, 2)})
    return release


def _write_face(path, rng):
    """Draw one crop of random non-square size; return its keypoints (5×2, (x, y)) and (w, h)."""
    width, height = int(rng.integers(70, 130)), int(rng.integers(70, 130))
    xy = (FACE_LAYOUT + rng.uniform(-0.03, 0.03, size=FACE_LAYOUT.shape)) * [width, height]
    background = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse([0.15 * width, 0.1 * height, 0.85 * width, 0.95 * height], fill=(224, 172, 140))
    radius = 0.04 * min(width, height)
    for x, y in xy:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(40, 20, 20))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return xy, (width, height)
