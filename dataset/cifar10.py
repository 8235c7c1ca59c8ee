"""CIFAR-10: torchvision's files, the labeled/unlabeled/validation split and the augmentation of docs/data.md §1.

The split and all augmentation randomness use numpy's global RNG, as the authors' code does, so that
``--manualSeed`` fixes the split and (with ``--workers 0``, the default) the augmentation stream.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.datasets import CIFAR10

from utils.errors import UserError

NUM_CLASSES = 10
MEAN = np.array((0.4914, 0.4822, 0.4465), np.float32)
STD = np.array((0.2471, 0.2435, 0.2616), np.float32)
HOW_TO_GET = ("torchvision downloads it on a machine with internet access, or put the extracted "
              "cifar-10-batches-py/ folder from https://www.cs.toronto.edu/~kriz/cifar.html there")


class CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10, accepting any data in the official python-pickle format.

    torchvision also compares md5 sums of the batch files; we only require the files, so that the
    same reader serves the official data and the small datasets the tests write in that format.
    """
    meta = dict(CIFAR10.meta, md5=None)

    def _check_integrity(self):
        return _has_files(self.root)


def read_cifar10(root):
    """(train images uint8 N×32×32×3, train labels, test images, test labels); downloads when missing."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist; create it (CIFAR-10 is downloaded into it) "
                        f"or pass --data-root DIR")
    try:
        train = CIFAR10Files(root, train=True, download=not _has_files(root))
        test = CIFAR10Files(root, train=False)
    except (OSError, RuntimeError) as exc:  # network errors are OSErrors
        raise UserError(f"CIFAR-10 not found in {os.path.join(root, 'cifar-10-batches-py')} and could not "
                        f"be downloaded ({exc.__class__.__name__}: {exc}); {HOW_TO_GET}") from None
    except Exception as exc:  # a malformed pickle can raise many types
        raise UserError(f"cannot read CIFAR-10 in {os.path.join(root, 'cifar-10-batches-py')} "
                        f"({exc.__class__.__name__}: {exc}); {HOW_TO_GET}") from None
    return train.data, np.asarray(train.targets), test.data, np.asarray(test.targets)


def _has_files(root):
    base = os.path.join(root, CIFAR10.base_folder)
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    return all(os.path.isfile(os.path.join(base, name)) for name in names)


def labeled_count(n_labeled, pool_size):
    """``--n-labeled`` as a count (≥ 1), fraction (0, 1) or -1 (all of the pool), divisible into classes."""
    if n_labeled == -1:
        return pool_size
    count = round(n_labeled * pool_size) if n_labeled < 1 else n_labeled
    if count != int(count):
        raise UserError(f"--n-labeled {n_labeled}: a count of labeled images must be a whole number")
    count = int(count)
    if count < NUM_CLASSES or count % NUM_CLASSES:
        raise UserError(f"--n-labeled {n_labeled} gives {count} labeled images; CIFAR-10 splits them evenly "
                        f"over its {NUM_CLASSES} classes, so it must be a positive multiple of {NUM_CLASSES}")
    if count > pool_size:
        raise UserError(f"--n-labeled {n_labeled} is more than the {pool_size} training images left after "
                        f"the validation hold-out")
    return count


def split_indices(labels, n_labeled, n_val):
    """docs/data.md §1.2 split; consumes numpy's global RNG exactly like the authors' code.

    Per class: shuffle its indices; the first n_labeled/10 are labeled, the last n_val/10 validation,
    the rest unlabeled. ``n_labeled == -1`` marks every non-validation image labeled, and the unlabeled
    stream then runs over those same images (as AFLW's ``-1`` does).
    """
    if n_val % NUM_CLASSES or n_val < NUM_CLASSES:
        raise UserError(f"--n-val {n_val} must be a positive multiple of {NUM_CLASSES} (validation images "
                        f"are taken evenly from each class)")
    val_per_class = n_val // NUM_CLASSES
    class_size = min(np.sum(labels == c) for c in range(NUM_CLASSES))
    if val_per_class >= class_size:
        raise UserError(f"--n-val {n_val} leaves no training images: the smallest class has {class_size}")
    n_labeled = labeled_count(n_labeled, len(labels) - n_val)
    per_class = n_labeled // NUM_CLASSES
    labeled, unlabeled, validation, unused_a, unused_b = [], [], [], [], []
    for c in range(NUM_CLASSES):
        idxs = np.where(labels == c)[0]
        np.random.shuffle(idxs)
        train_part = idxs[:-val_per_class]
        if per_class > len(train_part):
            raise UserError(f"--n-labeled {n_labeled} asks for {per_class} images of class {c}, which has "
                            f"only {len(train_part)} outside the validation hold-out")
        labeled.extend(train_part[:per_class])
        unlabeled.extend(train_part[per_class:])
        validation.extend(idxs[-val_per_class:])
        # The authors also build two unused halves of the labeled set; their shuffles below consume
        # RNG draws, so we keep them to keep the numpy stream the same (docs/data.md §1).
        unused_a.extend(train_part[:per_class // 2 + 1])
        unused_b.extend(train_part[per_class // 2 + 1:per_class])
    if per_class == len(train_part):  # --n-labeled -1: no image is left out of the labeled set
        unlabeled = list(labeled)
    for index_list in (labeled, unlabeled, validation, unused_a, unused_b):
        np.random.shuffle(index_list)
    return {"labeled": [int(i) for i in labeled], "unlabeled": [int(i) for i in unlabeled],
            "validation": [int(i) for i in validation]}


def normalise(image):
    """uint8 HWC → float32 CHW, ``(x - 255·mean) / (255·std)`` as the authors compute it."""
    x = image.astype(np.float32)
    x -= MEAN * 255
    x *= 1.0 / (255 * STD)
    return x.transpose(2, 0, 1)


def augment(x):
    """Reflect-pad 4, random 32×32 crop with offsets 0…7 (the authors' off-by-one), flip with p = 0.5."""
    x = np.pad(x, [(0, 0), (4, 4), (4, 4)], mode="reflect")
    top = np.random.randint(0, x.shape[1] - 32)
    left = np.random.randint(0, x.shape[2] - 32)
    x = x[:, top:top + 32, left:left + 32]
    if np.random.rand() < 0.5:
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x)


class CifarImages(torch.utils.data.Dataset):
    """Images at ``indices``; ``views`` = 0 (no augmentation), 1 (one view) or 2 (two independent views)."""

    def __init__(self, images, labels, indices, views):
        self.images, self.labels, self.indices, self.views = images, labels, np.asarray(indices), views

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image = normalise(self.images[self.indices[i]])
        label = int(self.labels[self.indices[i]])
        if self.views == 0:
            return torch.from_numpy(image), label
        if self.views == 1:
            return torch.from_numpy(augment(image)), label
        return (torch.from_numpy(augment(image)), torch.from_numpy(augment(image))), label


@dataclass
class CifarData:
    labeled: CifarImages      # augmented; also serves the L2I meta batches
    unlabeled: CifarImages    # two augmented views
    val: CifarImages
    test: CifarImages
    split: dict


def load_cifar10(root, n_labeled, n_val):
    train_x, train_y, test_x, test_y = read_cifar10(root)
    split = split_indices(train_y, n_labeled, n_val)
    split["test"] = len(test_y)
    return CifarData(labeled=CifarImages(train_x, train_y, split["labeled"], views=1),
                     unlabeled=CifarImages(train_x, train_y, split["unlabeled"], views=2),
                     val=CifarImages(train_x, train_y, split["validation"], views=0),
                     test=CifarImages(test_x, test_y, np.arange(len(test_y)), views=0),
                     split=split)


def augment_batch(x, generator=None):
    """``augment`` for a whole float batch B×3×32×32 on its device, from torch's RNG: reflect-pad 4,
    per-image crop offsets uniform in 0…7, per-image flip with p = 0.5 (same distribution)."""
    n, device = len(x), x.device
    x = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    top = torch.randint(0, 8, (n,), device=device, generator=generator)
    left = torch.randint(0, 8, (n,), device=device, generator=generator)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    steps = torch.arange(32, device=device)
    rows, cols = top[:, None] + steps, left[:, None] + steps
    x = x[torch.arange(n, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # B×32×32×3
    x = x.permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], x.flip(3), x).contiguous()


class EndlessShuffle(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices of ``range(n)`` for one epoch of ``batches`` iterations: pass after pass,
    each a fresh permutation cut into whole batches (the last partial batch of a pass is dropped).

    The authors restart a shuffled, drop-last DataLoader whenever it runs out (every 3 iterations at 250
    labels, docs/method.md §2.6). One loader iterator over this sampler draws the same batches without the
    restarts, which on a GPU re-create every worker process each time. Each pass consumes torch's RNG as a
    restarted loader did — a number for the new iterator's workers (from the second pass on: the first
    pass's was drawn when the iterator was made), then the permutation's seed — so the batches, and runs
    with ``--workers 0``, are exactly those of the restarting loader.
    """

    def __init__(self, n, batch_size, batches):
        self.n, self.batch_size, self.batches = n, batch_size, batches

    def __len__(self):
        return self.batches

    def __iter__(self):
        produced = 0
        while True:
            if produced:
                torch.empty((), dtype=torch.int64).random_()  # what a restarted loader drew for its workers
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
            for start in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield order[start:start + self.batch_size]
                produced += 1
                if produced == self.batches:
                    return


class DeviceBatches:
    """``--data-on-device``: a drop-in for the training DataLoader over ``CifarImages`` that keeps the
    uint8 images on the device and normalises and augments whole batches there (shuffled, drop-last).
    Yields what the DataLoader would: ``(x, labels)`` or ``((view1, view2), labels)``; ``batches`` of them
    per iteration over fresh permutations (as ``EndlessShuffle``), or one pass when ``batches`` is None."""

    def __init__(self, dataset, batch_size, device, batches=None):
        subset = dataset.images[dataset.indices]
        self.images = torch.from_numpy(subset).to(device)  # N×32×32×3 uint8
        self.labels = torch.from_numpy(dataset.labels[dataset.indices]).long().to(device)
        self.mean = torch.from_numpy(MEAN * 255).to(device)
        self.inv_std = torch.from_numpy(1.0 / (255 * STD)).to(device)
        self.batch_size, self.views = batch_size, dataset.views
        self.batches = len(self.images) // batch_size if batches is None else batches

    def __len__(self):
        return self.batches

    def __iter__(self):
        per_pass, device = len(self.images) // self.batch_size, self.images.device
        for b in range(self.batches):
            if b % per_pass == 0:
                order = torch.randperm(len(self.images), device=device)  # on the device: no host copy
            idx = order[(b % per_pass) * self.batch_size:(b % per_pass + 1) * self.batch_size]
            x = ((self.images[idx].float() - self.mean) * self.inv_std).permute(0, 3, 1, 2)
            if self.views == 2:
                yield (augment_batch(x), augment_batch(x)), self.labels[idx]
            else:
                yield augment_batch(x), self.labels[idx]
