"""Reader of the IMM AFLW release ``aflw_release-2`` and the L2I labeled/unlabeled split (docs/data.md §2).

Layout under ``root``: ``aflw_{train,test}_images.txt`` (one path per line, relative to ``output/``),
``aflw_{train,test}_keypoints.mat`` (``gt``: N×5×2 keypoints stored (y, x)), ``output/<subdir>/*.jpg``.

Every image is decoded once at start-up (RGB → 60×60 bilinear → grayscale "L", uint8) and kept in
memory (≈47 MB for the full release). The authors convert to grayscale *after* the random translation;
caching the grayscale image is exact because the reflect translation only permutes pixels and "L" is a
per-pixel map, so the two commute. Decoding up front also means a corrupt image stops the run at
start-up rather than mid-training, and leaves DataLoader workers with nothing but cheap array slicing.

Augmentation offsets come from numpy's global RNG: the training script seeds it in the main process
and PyTorch seeds it per DataLoader worker (docs/faithfulness.md §2.10), so runs are deterministic given the seed.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from utils.errors import UserError

IMAGE_SIZE = 60
MAX_SHIFT = 4
NUM_POINTS = 5
VALIDATION_FRACTION = 0.1
TRAIN_FILES = ("aflw_train_images.txt", "aflw_train_keypoints.mat")
TEST_FILES = ("aflw_test_images.txt", "aflw_test_keypoints.mat")
DOWNLOAD_HINT = ("download aflw_release-2.zip from the IMM project (github.com/tomasjakab/imm) "
                 "and unzip it into ./data/")
# What scipy raises on a damaged or non-MATLAB file (IndexError for arbitrary bytes).
_MAT_READ_ERRORS = (scipy.io.matlab.MatReadError, ValueError, IndexError, TypeError, EOFError, OSError)


@dataclass
class AflwData:
    """Everything a training script needs from AFLW (docs/data.md §2).

    ``labeled`` also serves as the L2I meta set (give it a second, independent loader).
    ``split`` holds line indices into ``aflw_train_images.txt`` (``"labeled"``, ``"unlabeled"``,
    ``"validation"``) and the test-set size (``"test"``).
    """
    labeled: Dataset
    unlabeled: Dataset
    val: Dataset
    test: Dataset
    target_mean: torch.Tensor
    target_std: torch.Tensor
    split: dict
    n_train: int


class AflwImages:
    """One image list decoded to 60×60 grayscale uint8 plus its untranslated 60×60-frame targets."""

    def __init__(self, images, targets):
        self.images = images    # (N, 60, 60) uint8
        self.targets = targets  # (N, 10) float32, [x0, y0, …, x4, y4]

    def __len__(self):
        return len(self.images)


class AflwLabeled(Dataset):
    """``(image 1×60×60 in [0, 1], target (10,) pixels)``; random translation optional (docs/data.md §2.4)."""

    def __init__(self, store, indices, translate):
        self.store = store
        self.indices = list(indices)
        self.translate = translate

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        dx, dy = (random_offset(), random_offset()) if self.translate else (0, 0)
        return translated_sample(self.store, i, dx, dy)


class AflwUnlabeled(Dataset):
    """``(view1, dx1, dy1, view2, dx2, dy2)``: two independent translations of one image (docs/data.md §2.4)."""

    def __init__(self, store, indices):
        self.store = store
        self.indices = list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        # The authors draw view 2's offsets before view 1's.
        dx2, dy2 = random_offset(), random_offset()
        dx1, dy1 = random_offset(), random_offset()
        view1 = to_tensor(translate_reflect(self.store.images[i], dx1, dy1))
        view2 = to_tensor(translate_reflect(self.store.images[i], dx2, dy2))
        return view1, dx1, dy1, view2, dx2, dy2


class RepeatPermutationSampler(Sampler):
    """``num_samples`` indices from ``range(n)``: whole fresh permutations, then part of one more.

    docs/method.md §2.6 (re-implemented: the authors' version needs the removed ``torch._six``, docs/faithfulness.md §2.2).
    Every index appears ⌊M/n⌋ or ⌊M/n⌋+1 times; a new draw from torch's RNG at every ``__iter__``.
    """

    def __init__(self, n, num_samples, generator=None):
        if n < 1 or num_samples < 1:
            raise ValueError(f"need n >= 1 and num_samples >= 1, got n={n}, num_samples={num_samples}")
        self.n = n
        self.num_samples = num_samples
        self.generator = generator

    def __iter__(self):
        full, rest = divmod(self.num_samples, self.n)
        perms = [torch.randperm(self.n, generator=self.generator) for _ in range(full)]
        if rest:
            perms.append(torch.randperm(self.n, generator=self.generator)[:rest])
        return iter(torch.cat(perms).tolist())

    def __len__(self):
        return self.num_samples


def random_offset():
    """One translation component, uniform in {−4, …, 4}, from numpy's global RNG."""
    return int(np.random.randint(-MAX_SHIFT, MAX_SHIFT + 1))


def translate_reflect(image, dx, dy):
    """Shift an H×W array so that output pixel (u, v) shows input (u − dx, v − dy) (docs/data.md §2.4 step 3).

    The authors fill the border with mirrored (flipped) copies of the image, i.e. the edge pixel is
    repeated — numpy's ``"symmetric"`` padding, not ``"reflect"``.
    """
    pad = max(abs(dx), abs(dy))
    padded = np.pad(image, pad, mode="symmetric")
    height, width = image.shape
    return padded[pad - dy:pad - dy + height, pad - dx:pad - dx + width]


def to_tensor(image):
    """uint8 H×W → float32 1×H×W in [0, 1] (as torchvision's ``ToTensor``; no mean/std)."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).div(255).unsqueeze(0)


def translated_sample(store, i, dx, dy):
    """Image ``i`` translated by (dx, dy) and its target moved with it: ``x' = x/w·60 + dx``."""
    shift = np.tile(np.array([dx, dy], dtype=np.float32), NUM_POINTS)
    image = to_tensor(translate_reflect(store.images[i], dx, dy))
    return image, torch.from_numpy(store.targets[i] + shift)


def load_aflw(root, n_labeled, rng_generator=None):
    """Check and load the release at ``root`` and draw the labeled subset (docs/data.md §2).

    ``n_labeled``: -1 → all training images (no permutation drawn); 0 < v < 1 → fraction,
    ``round(N_train·v)`` half-to-even; v ≥ 1 → integer count. Otherwise one
    ``torch.randperm(N_train, generator=rng_generator)``: its first n entries are labeled, and all of it
    (labeled images included) is the unlabeled set. Bad data or values raise ``UserError``.
    """
    root = Path(root)
    train_paths, train_gt = read_release_list(root, *TRAIN_FILES)
    test_paths, test_gt = read_release_list(root, *TEST_FILES)
    n_validation = round(VALIDATION_FRACTION * len(train_paths))
    n_train = len(train_paths) - n_validation
    if n_train < 2 or n_validation < 1:
        raise UserError(f"AFLW release in {root} is unusable: {TRAIN_FILES[0]} lists {len(train_paths)} "
                        f"images, too few for a training and a 10 % validation split; {DOWNLOAD_HINT}")
    labeled, unlabeled = draw_split(n_labeled, n_train, rng_generator)

    train = decode_list(root, train_paths, train_gt)
    test = decode_list(root, test_paths, test_gt)
    untranslated = torch.from_numpy(train.targets[labeled]).to(torch.float64)
    return AflwData(
        labeled=AflwLabeled(train, labeled, translate=True),
        unlabeled=AflwUnlabeled(train, unlabeled),
        val=AflwLabeled(train, range(n_train, len(train)), translate=False),
        test=AflwLabeled(test, range(len(test)), translate=False),
        target_mean=untranslated.mean(dim=0).to(torch.float32),
        target_std=untranslated.std(dim=0).to(torch.float32),
        split={"labeled": labeled, "unlabeled": unlabeled,
               "validation": list(range(n_train, len(train))), "test": len(test)},
        n_train=n_train,
    )


def draw_split(n_labeled, n_train, rng_generator=None):
    """(labeled, unlabeled) training indices as lists of ints; see ``load_aflw``."""
    count = labeled_count(n_labeled, n_train)
    if count is None:
        everything = list(range(n_train))
        return everything, everything
    order = torch.randperm(n_train, generator=rng_generator).tolist()
    return order[:count], order


def labeled_count(n_labeled, n_train):
    """Labeled-image count for ``--n-labeled`` (None = all, no permutation); docs/data.md §2.3, docs/faithfulness.md §2.16."""
    value = float(n_labeled)
    usage = (f"use -1 (all {n_train} training images), a fraction in (0, 1), "
             f"or a whole count from 2 to {n_train}")
    if value == -1:
        return None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--n-labeled {value:g} is invalid: {usage}")
    if value < 1:
        count = int(np.round(n_train * value))
        what = f"selects {count} of the {n_train} training images"
    elif value.is_integer():
        count = int(value)
        what = f"asks for {count} labeled image(s)"
    else:
        raise UserError(f"--n-labeled {value:g} is not a whole count: {usage}")
    # Two images at least: the target std (docs/data.md §2.5) is undefined for one.
    if not 2 <= count <= n_train:
        raise UserError(f"--n-labeled {value:g} {what}: {usage}")
    return count


def release_error(root, problem):
    return UserError(f"AFLW release not usable: {problem} (looked in {root}); {DOWNLOAD_HINT}")


def read_release_list(root, list_name, mat_name):
    """Image paths of one list and its keypoints as (N, 5, 2) (x, y), checked against each other."""
    if not root.is_dir():
        raise release_error(root, "the folder does not exist")
    for name in (list_name, mat_name):
        if not (root / name).is_file():
            raise release_error(root, f"{name} is missing")
    paths = [line.strip() for line in (root / list_name).read_text().splitlines() if line.strip()]
    if not paths:
        raise release_error(root, f"{list_name} lists no images")
    gt = read_keypoints(root, mat_name, len(paths), list_name)
    missing = [p for p in paths if not (root / "output" / p).is_file()]
    if missing:
        raise release_error(root, f"{len(missing)} image(s) listed in {list_name} are missing, "
                                  f"e.g. output/{missing[0]}")
    return paths, gt


def read_keypoints(root, mat_name, n_rows, list_name):
    """``gt`` of a keypoint file, swapped from the stored (y, x) to (x, y)."""
    try:
        gt = scipy.io.loadmat(str(root / mat_name)).get("gt")
    except _MAT_READ_ERRORS as err:
        raise release_error(root, f"{mat_name} is not a readable MATLAB file ({err})") from err
    if gt is None:
        raise release_error(root, f"{mat_name} has no 'gt' field")
    if gt.ndim != 3 or gt.shape[1:] != (NUM_POINTS, 2) or not np.issubdtype(gt.dtype, np.number):
        raise release_error(root, f"'gt' in {mat_name} has shape {gt.shape} ({gt.dtype}), "
                                  f"expected N×{NUM_POINTS}×2 numbers")
    if len(gt) != n_rows:
        raise release_error(root, f"{mat_name} has {len(gt)} keypoint rows but {list_name} lists "
                                  f"{n_rows} images")
    return gt[..., ::-1].astype(np.float64)


def decode_list(root, paths, gt):
    """Decode every image of a list (threads: PIL releases the GIL) and scale its keypoints to 60×60."""
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda p: decode_image(root, p), paths))
    images = np.stack([image for image, _ in decoded])
    sizes = np.array([size for _, size in decoded], dtype=np.float64)  # (N, 2) = (w, h)
    targets = gt / sizes[:, None, :] * IMAGE_SIZE
    return AflwImages(images, targets.reshape(len(paths), 2 * NUM_POINTS).astype(np.float32))


def decode_image(root, relative_path):
    """docs/data.md §2.4 steps 1, 2, 4: RGB, remember (w, h), bilinear resize to 60×60, grayscale "L"."""
    path = root / "output" / relative_path
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as err:
        raise release_error(root, f"image output/{relative_path} cannot be decoded ({err})") from err
    small = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("L")
    return np.asarray(small, dtype=np.uint8), rgb.size
