"""Tiny datasets in the real on-disk formats, with content a network can learn from.

Used by the tests (on the CPU and, with ``--device cuda``, on a GPU): CIFAR-10 as torchvision's python-pickle batches
(``cifar-10-batches-py/``) and AFLW in the IMM ``aflw_release-2`` layout (``.mat`` keypoints, JPEG
crops under ``output/``). The AFLW "faces" are skin-coloured ellipses with dark eye, nose and mouth
dots at the keypoints; CIFAR-10 images are noise whose mean colour depends on the class.
"""
import os
import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw


def _write_batch(path, images, labels, name):
    entry = {"batch_label": name, "labels": [int(v) for v in labels], "data": images.reshape(len(images), -1),
             "filenames": [f"img_{i}.png" for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def make_cifar10(root, per_class_train=12, per_class_test=4, seed=0):
    """Write ``root/cifar-10-batches-py`` with 10·per_class_train training and 10·per_class_test test
    images (random uint8 images whose mean colour depends on the class, so a network can learn)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def images_for(labels):
        base = (labels[:, None, None, None] * 23 % 256).astype(np.int64)
        noise = rng.integers(0, 96, size=(len(labels), 3, 32, 32))
        return ((base + noise) % 256).astype(np.uint8)  # stored as N × (3·32·32), channel-major

    train_labels = rng.permutation(np.repeat(np.arange(10), per_class_train))
    train_images = images_for(train_labels)
    for b, part in enumerate(np.array_split(np.arange(len(train_labels)), 5)):
        _write_batch(os.path.join(folder, f"data_batch_{b + 1}"), train_images[part], train_labels[part],
                     f"training batch {b + 1} of 5")
    test_labels = rng.permutation(np.repeat(np.arange(10), per_class_test))
    _write_batch(os.path.join(folder, "test_batch"), images_for(test_labels), test_labels, "testing batch 1 of 1")
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": len(train_labels) // 5,
                     "num_vis": 3072}, f)
    return root


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
