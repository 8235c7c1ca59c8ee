"""AFLW pieces: TCDCNN, landmark maths, the IMM release reader and the repeat-permutation sampler.

Pins the AFLW facts of docs/ (network size, shift compensation, sampler counts, metrics) and the data rules of
docs/data.md §2 on a tiny generated release.
"""
from collections import Counter

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dataset.aflw import RepeatPermutationSampler, load_aflw, translate_reflect
from models.tcdcnn import TCDCNN
from dataset.synthetic import make_aflw_release
from utils.errors import UserError
from utils.landmarks import (denormalise, error_and_failure_sums, landmark_errors, normalise,
                             shift_compensate)

N_TRAIN_LINES, N_TEST = 40, 12
N_VALIDATION = 4                       # round(0.1 · 40)
N_TRAIN = N_TRAIN_LINES - N_VALIDATION


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_aflw_release(tmp_path_factory.mktemp("aflw"), n_train=N_TRAIN_LINES, n_test=N_TEST)


@pytest.fixture(scope="module")
def data(release):
    torch.manual_seed(0)
    return load_aflw(release, 0.25)


def untranslated(dataset, k):
    """Cached 60×60 image and target of item k, before any translation."""
    i = dataset.indices[k]
    return dataset.store.images[i], dataset.store.targets[i]


# --- TCDCNN (docs/models.md §2) ---------------------------------------------------------------------------

def test_tcdcnn_has_paper_parameter_count_and_output_shape():
    model = TCDCNN()
    assert sum(p.numel() for p in model.parameters()) == 285_586
    assert model(torch.rand(3, 1, 60, 60)).shape == (3, 10)


# --- translation and per-sample pipeline (docs/data.md §2) ----------------------------------------------

def mirror(index, size):
    """Input index shown at an out-of-range position when borders are mirrored copies."""
    if index < 0:
        return -index - 1
    if index >= size:
        return 2 * size - 1 - index
    return index


@pytest.mark.parametrize("dx, dy", [(3, -2), (-4, 4), (0, 0), (4, -4)])
def test_translation_shows_input_pixel_u_minus_dx_v_minus_dy(dx, dy):
    image = np.arange(7 * 9, dtype=np.uint8).reshape(7, 9)
    out = translate_reflect(image, dx, dy)
    assert out.shape == image.shape
    for v in range(7):
        for u in range(9):
            assert out[v, u] == image[mirror(v - dy, 7), mirror(u - dx, 9)]


def test_cached_image_equals_spec_pipeline(release, data):
    line = data.split["labeled"][0]
    relative = (release / "aflw_train_images.txt").read_text().splitlines()[line]
    rgb = Image.open(release / "output" / relative).convert("RGB")
    expected = np.asarray(rgb.resize((60, 60), Image.Resampling.BILINEAR).convert("L"))
    image, target = untranslated(data.labeled, 0)
    np.testing.assert_array_equal(image, expected)
    gt = scipy.io.loadmat(release / "aflw_train_keypoints.mat")["gt"][line][:, ::-1]
    np.testing.assert_allclose(target, (gt / rgb.size * 60).ravel(), rtol=1e-6)


def test_labeled_sample_is_translated_with_its_target(data):
    np.random.seed(3)
    dx, dy = np.random.randint(-4, 5), np.random.randint(-4, 5)
    np.random.seed(3)
    image, target = data.labeled[0]
    base_image, base_target = untranslated(data.labeled, 0)
    assert image.shape == (1, 60, 60) and image.dtype == torch.float32 and target.shape == (10,)
    expected = torch.from_numpy(translate_reflect(base_image, dx, dy).astype(np.float32) / 255)
    torch.testing.assert_close(image[0], expected)
    shift = torch.tensor([dx, dy] * 5, dtype=torch.float32)
    torch.testing.assert_close(target, torch.from_numpy(base_target) + shift)


def test_validation_and_test_samples_are_not_translated(data):
    for dataset in (data.val, data.test):
        image, target = dataset[1]
        base_image, base_target = untranslated(dataset, 1)
        torch.testing.assert_close(image[0], torch.from_numpy(base_image.astype(np.float32) / 255))
        torch.testing.assert_close(target, torch.from_numpy(base_target))


def test_unlabeled_views_draw_view2_offsets_first(data):
    np.random.seed(7)
    dx2, dy2, dx1, dy1 = (np.random.randint(-4, 5) for _ in range(4))
    np.random.seed(7)
    view1, *offsets1, view2, dx2_, dy2_ = data.unlabeled[5]
    assert (offsets1, dx2_, dy2_) == ([dx1, dy1], dx2, dy2)
    base, _ = untranslated(data.unlabeled, 5)
    torch.testing.assert_close(view1[0], torch.from_numpy(translate_reflect(base, dx1, dy1) / 255.).float())
    torch.testing.assert_close(view2[0], torch.from_numpy(translate_reflect(base, dx2, dy2) / 255.).float())


def test_shift_compensation_maps_exact_view2_truth_to_view1_truth(data):
    """docs/method.md §2.5: S(n(ground truth of view 2)) = n(ground truth of view 1), through real samples."""
    np.random.seed(11)
    batch = [data.unlabeled[k] for k in range(8)]
    dx1, dy1, dx2, dy2 = (torch.tensor([item[j] for item in batch]) for j in (1, 2, 4, 5))
    base = torch.stack([torch.from_numpy(untranslated(data.unlabeled, k)[1]) for k in range(8)])
    view1_truth = base + torch.stack([dx1, dy1], 1).repeat(1, 5)
    view2_truth = base + torch.stack([dx2, dy2], 1).repeat(1, 5)
    mean, std = data.target_mean, data.target_std
    compensated = shift_compensate(normalise(view2_truth, mean, std), dx1, dy1, dx2, dy2, mean, std)
    torch.testing.assert_close(denormalise(compensated, mean, std), view1_truth, atol=1e-4, rtol=0)
    torch.testing.assert_close(compensated, normalise(view1_truth, mean, std), atol=1e-5, rtol=0)


def test_shift_compensation_is_differentiable_with_scaled_identity_jacobian():
    mean, std = torch.zeros(10), torch.arange(1.0, 11.0)
    v2 = torch.randn(2, 10, requires_grad=True)
    offsets = [torch.tensor([1, -2]), torch.tensor([0, 3]), torch.tensor([4, 4]), torch.tensor([-4, 0])]
    shift_compensate(v2, *offsets, mean, std).sum().backward()
    torch.testing.assert_close(v2.grad, torch.ones(2, 10))


# --- repeat-permutation sampler (docs/method.md §2.6) -----------------------------------------------------

def test_repeat_permutation_sampler_counts_and_length():
    torch.manual_seed(0)
    sampler = RepeatPermutationSampler(91, 19_200)
    indices = list(sampler)
    assert len(sampler) == len(indices) == 19_200
    counts = Counter(indices)
    assert set(counts) == set(range(91))
    assert set(counts.values()) == {210, 211}
    assert sum(c == 211 for c in counts.values()) == 19_200 - 91 * 210
    assert sorted(indices[:91]) == list(range(91))                  # whole permutations first
    assert list(sampler) != indices                                 # fresh draw per epoch


# --- metrics (docs/evaluation.md §2) --------------------------------------------------------------------------

def face_targets(n, dtype=torch.float64):
    torch.manual_seed(1)
    layout = torch.tensor([[20.0, 25.0], [40.0, 25.0], [30.0, 35.0], [22.0, 45.0], [38.0, 45.0]])
    return (layout + torch.rand(n, 5, 2) * 4).to(dtype).reshape(n, 10)


@pytest.mark.parametrize("scale, failure_rate", [(0.05, 0.0), (0.2, 1.0)])
def test_metric_on_uniformly_displaced_predictions(scale, failure_rate):
    target = face_targets(16)
    points = target.reshape(16, 5, 2)
    iod = (points[:, 0] - points[:, 1]).norm(dim=1)
    angle = torch.rand(16, 5, dtype=torch.float64) * 2 * torch.pi
    direction = torch.stack([angle.cos(), angle.sin()], dim=2)
    pred = points + scale * iod[:, None, None] * direction
    error_sum, failures = error_and_failure_sums(pred.reshape(16, 10), target)
    assert error_sum.item() / 16 == pytest.approx(scale, rel=1e-12)
    assert failures.item() / 16 == failure_rate
    assert landmark_errors(pred.reshape(16, 10), target).shape == (16,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_failure_is_strictly_above_one_tenth(dtype):
    # Eyes 10 px apart; every point off by exactly 1 px → err = 0.1 exactly (in the dtype): no failure.
    target = torch.tensor([[20, 30, 30, 30, 25, 36, 21, 40, 29, 40.0]], dtype=dtype)
    exactly = target + torch.tensor([1.0, 0.0] * 5, dtype=dtype)
    assert landmark_errors(exactly, target).item() == torch.tensor(0.1, dtype=dtype).item()
    assert error_and_failure_sums(exactly, target)[1] == 0
    above = target + torch.tensor([1.01, 0.0] * 5, dtype=dtype)
    assert error_and_failure_sums(above, target)[1] == 1


# --- split and statistics (docs/data.md §2) -------------------------------------------------------------

@pytest.mark.parametrize("n_labeled, expected", [
    (0.25, 9),        # round(36 · 0.25)
    (0.125, 4),       # 36 · 0.125 = 4.5 → half-to-even
    (0.375, 14),      # 13.5 → 14
    (7.0, 7),
    (36.0, 36),
    (-1.0, 36),
])
def test_labeled_subset_sizes_and_split(release, n_labeled, expected):
    torch.manual_seed(0)
    data = load_aflw(release, n_labeled)
    split = data.split
    assert data.n_train == N_TRAIN
    assert len(data.labeled) == len(split["labeled"]) == expected
    assert len(data.unlabeled) == len(split["unlabeled"]) == N_TRAIN
    assert sorted(split["unlabeled"]) == list(range(N_TRAIN))
    assert set(split["labeled"]) <= set(split["unlabeled"])
    assert split["validation"] == list(range(N_TRAIN, N_TRAIN_LINES)) and len(data.val) == N_VALIDATION
    assert split["test"] == len(data.test) == N_TEST
    if n_labeled > 0:
        assert split["unlabeled"][:expected] == split["labeled"]


def test_split_draws_one_randperm_from_torch_or_none_for_all(release):
    torch.manual_seed(5)
    expected = torch.randperm(N_TRAIN).tolist()
    torch.manual_seed(5)
    assert load_aflw(release, 10.0).split["unlabeled"] == expected
    torch.manual_seed(5)
    assert load_aflw(release, -1.0).split["unlabeled"] == list(range(N_TRAIN))
    assert torch.randperm(N_TRAIN).tolist() == expected             # -1 consumed no randomness
    generator = torch.Generator().manual_seed(5)
    assert load_aflw(release, 10.0, rng_generator=generator).split["unlabeled"] == expected


def test_target_statistics_come_from_untranslated_labeled_targets(data):
    targets = torch.stack([torch.from_numpy(untranslated(data.labeled, k)[1])
                           for k in range(len(data.labeled))]).double()
    assert data.target_mean.dtype == data.target_std.dtype == torch.float32
    assert data.target_mean.shape == data.target_std.shape == (10,)
    torch.testing.assert_close(data.target_mean, targets.mean(0).float())
    torch.testing.assert_close(data.target_std, targets.std(0, unbiased=True).float())


# --- bad input: one clear UserError each ----------------------------------------------------------

def remove(name):
    return lambda root: (root / name).unlink()


def save_mat(content):
    return lambda root: scipy.io.savemat(root / "aflw_train_keypoints.mat", content)


def first_image(root, split):
    return root / "output" / (root / f"aflw_{split}_images.txt").read_text().splitlines()[0]


def drop_first_image(root):
    first_image(root, "train").unlink()


def corrupt_first_test_image(root):
    first_image(root, "test").write_bytes(b"not a jpeg")


@pytest.mark.parametrize("damage, message", [
    (remove("aflw_train_images.txt"), "aflw_train_images.txt is missing"),
    (remove("aflw_test_images.txt"), "aflw_test_images.txt is missing"),
    (remove("aflw_train_keypoints.mat"), "aflw_train_keypoints.mat is missing"),
    (save_mat({"hw": np.ones((10, 2))}), "has no 'gt' field"),
    (save_mat({"gt": np.ones((10, 2, 5))}), "'gt' in aflw_train_keypoints.mat has shape (10, 2, 5)"),
    (save_mat({"gt": np.ones((9, 5, 2))}), "has 9 keypoint rows but aflw_train_images.txt lists 10"),
    (lambda root: (root / "aflw_train_keypoints.mat").write_bytes(b"not a mat file" * 20),
     "not a readable MATLAB file"),
    (drop_first_image, "1 image(s) listed in aflw_train_images.txt are missing, e.g. output/0/"),
    (corrupt_first_test_image, "cannot be decoded"),
])
def test_damaged_release_raises_one_clear_user_error(tmp_path, damage, message):
    root = make_aflw_release(tmp_path, n_train=10, n_test=3)
    damage(root)
    with pytest.raises(UserError) as info:
        load_aflw(root, -1.0)
    text = str(info.value)
    assert message in text and str(root) in text and "github.com/tomasjakab/imm" in text
    assert "\n" not in text


def test_missing_folder_says_where_it_looked_and_how_to_get_the_data(tmp_path):
    with pytest.raises(UserError, match="folder does not exist .*nowhere.*tomasjakab/imm.*./data/"):
        load_aflw(tmp_path / "nowhere", -1.0)


@pytest.mark.parametrize("n_labeled, message", [
    (0.01, "--n-labeled 0.01 selects 0 of the 36 training images"),
    (37.0, "--n-labeled 37 asks for 37 labeled image(s)"),
    (1.0, "--n-labeled 1 asks for 1 labeled image(s)"),
    (0.0, "--n-labeled 0 is invalid"),
    (-5.0, "--n-labeled -5 is invalid"),
    (2.5, "--n-labeled 2.5 is not a whole count"),
    (float("nan"), "--n-labeled nan is invalid"),
])
def test_bad_n_labeled_raises_user_error(release, n_labeled, message):
    with pytest.raises(UserError) as info:
        load_aflw(release, n_labeled)
    assert message in str(info.value) and "-1" in str(info.value)
