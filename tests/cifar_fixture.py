"""A tiny CIFAR-10 in torchvision's on-disk python-pickle format (``cifar-10-batches-py/``)."""
import os
import pickle

import numpy as np


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
