"""CutPaste patch localization: map shape and range, planted defects, persistence, determinism, cancel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError

from core.errors import Cancelled, ConfigError, DataError
from core.explain import CutPastePatchLocalizer, image_scores_from_maps
from core.explain.crops import RandomPatchObjective, patch_grid, unfold_patches
from core.explain.smoothing import receptive_field_upsample
from core.progress import CancelToken, Monitor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64                    # synthetic image side and working resolution
SQUARE = (20, 28, 16)        # planted defect: top, left, side
FAST = dict(image_size=SIZE, patch_size=32, stride=8, fit_stride=8, epochs=2, patches_per_image=4, batch_size=32,
            device="cpu")    # a 5 x 5 patch grid; about 2 s to fit on one CPU thread


def stripes(rng: np.random.Generator, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """A normal synthetic texture: oblique sinusoidal stripes with a random phase and angle, plus noise."""
    y, x = np.mgrid[0:height, 0:width]
    angle, phase = rng.uniform(0.3, 0.5), rng.uniform(0, 2 * np.pi)
    value = 0.5 + 0.25 * np.sin(0.6 * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    value += rng.normal(0, 0.05, (height, width))
    return np.clip(value * 255, 0, 255).astype(np.uint8)


def plant_square(image: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """Paste a bright square into ``image`` in place; returns its ground-truth mask."""
    image[top:top + side, left:left + side] = 240
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """24 normal training images; 4 clean and 4 defective test images (squares at different places)."""
    folder = tmp_path_factory.mktemp("cutpaste_stripes")
    rng = np.random.default_rng(0)

    def save(image, name):
        path = folder / f"{name}.png"
        Image.fromarray(image).save(path)
        return path

    normal = [save(stripes(rng), f"normal_{index:02d}") for index in range(24)]
    clean = [save(stripes(rng), f"clean_{index}") for index in range(4)]
    defective, masks = [], []
    for index, (top, left) in enumerate([SQUARE[:2], (4, 4), (40, 8), (10, 44)]):
        image = stripes(rng)
        masks.append(plant_square(image, top, left, SQUARE[2]))
        defective.append(save(image, f"defective_{index}"))
    return normal, clean, defective, masks


@pytest.fixture(scope="module")
def fitted(synthetic):
    normal, _, _, _ = synthetic
    return CutPastePatchLocalizer(**FAST, seed=0).fit(normal)


def test_fit_trains_on_the_non_held_out_images_and_learns_one_gaussian(fitted):
    assert fitted.method == "cutpaste" and fitted.backbone_ == "small-cnn"
    assert fitted.n_train_images_ == 22                      # 10 % of 24 held out for the display scale
    assert fitted.n_fit_patches_ == 22 * 25                  # the whole 5 x 5 grid of every image
    assert fitted.mean_.shape == (256,) and fitted.precision_.shape == (256, 256)
    assert fitted.grid_shape_ == (5, 5)
    assert len(fitted.train_losses_) == 2 and all(np.isfinite(fitted.train_losses_))
    assert fitted.display_scale_ > 0


def test_maps_have_each_input_size_and_are_finite_and_non_negative(fitted, tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for height, width in [(SIZE, SIZE), (50, 70), (90, 61)]:
        path = tmp_path / f"{height}x{width}.jpg"
        Image.fromarray(stripes(rng, height, width)).convert("RGB").save(path)
        paths.append(path)
    maps = fitted.anomaly_maps(paths)
    assert [m.shape for m in maps] == [(SIZE, SIZE), (50, 70), (90, 61)]
    for anomaly_map in maps:
        assert anomaly_map.dtype == np.float32
        assert np.all(np.isfinite(anomaly_map)) and anomaly_map.min() >= 0.0
    assert fitted.anomaly_maps(paths, output_size=32)[1].shape == (32, 32)
    assert fitted.anomaly_maps(paths, output_size=(20, 30))[2].shape == (20, 30)


def test_planted_square_scores_higher_inside_than_outside(fitted, synthetic):
    _, _, defective, masks = synthetic
    for anomaly_map, mask in zip(fitted.anomaly_maps(defective), masks):
        assert anomaly_map[mask].mean() > anomaly_map[~mask].mean()
        # above the 99th percentile of held-out normal pixels
        assert fitted.normalize(anomaly_map)[mask].max() > 1.0


def test_image_score_max_of_map_ranks_defective_above_clean(fitted, synthetic):
    _, clean, defective, _ = synthetic
    clean_scores = image_scores_from_maps(fitted.anomaly_maps(clean))
    defective_scores = image_scores_from_maps(fitted.anomaly_maps(defective))
    assert defective_scores.min() > clean_scores.max()


def test_save_load_round_trip_gives_the_same_maps(fitted, synthetic, tmp_path):
    _, clean, defective, _ = synthetic
    fitted.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cutpaste_patch.json", "cutpaste_patch_encoder.safetensors", "cutpaste_patch_gaussian.safetensors"]
    loaded = CutPastePatchLocalizer.load(tmp_path)
    assert loaded.get_params() == fitted.get_params()
    assert loaded.display_scale_ == fitted.display_scale_ and loaded.grid_shape_ == fitted.grid_shape_
    assert torch.equal(loaded.precision_, fitted.precision_)
    paths = [clean[0], defective[0]]
    for got, expected in zip(loaded.anomaly_maps(paths), fitted.anomaly_maps(paths)):
        np.testing.assert_array_equal(got, expected)


def test_same_seed_same_maps_and_another_seed_other_maps(fitted, synthetic):
    normal, _, defective, _ = synthetic
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)                # the global state must not matter, only the seed
        again = CutPastePatchLocalizer(**FAST, seed=0).fit(normal)
    assert again.train_losses_ == fitted.train_losses_
    np.testing.assert_array_equal(again.anomaly_maps(defective[:1])[0], fitted.anomaly_maps(defective[:1])[0])
    other = CutPastePatchLocalizer(**FAST, seed=1).fit(normal)
    assert not np.array_equal(other.anomaly_maps(defective[:1])[0], fitted.anomaly_maps(defective[:1])[0])


def test_cancel_stops_training_and_maps(fitted, synthetic):
    normal, clean, _, _ = synthetic
    token = CancelToken()
    events = []

    def on_progress(event):
        events.append(event)
        if event.stage == "patch_train":
            token.cancel()

    with pytest.raises(Cancelled):
        CutPastePatchLocalizer(**FAST).fit(normal, monitor=Monitor(on_progress, token))
    assert [e.stage for e in events] == ["patch_read", "patch_read", "patch_train"]   # stopped after one step
    with pytest.raises(Cancelled):
        fitted.anomaly_maps(clean, monitor=Monitor(cancel=token))


def test_validation_and_not_fitted(synthetic):
    normal, _, _, _ = synthetic
    with pytest.raises(NotFittedError):
        CutPastePatchLocalizer(device="cpu").anomaly_maps(normal[:1])
    with pytest.raises(ConfigError, match="backbone must be one of 'auto', 'small-cnn', 'resnet18'; got 'vgg'"):
        CutPastePatchLocalizer(backbone="vgg").fit(normal)
    with pytest.raises(ConfigError, match="stride must be in \\[1, patch_size\\] = \\[1, 32\\]; got 33"):
        CutPastePatchLocalizer(**{**FAST, "stride": 33}).fit(normal)
    with pytest.raises(ConfigError, match="patch_size must be in \\[28, 64\\] pixels for backbone 'small-cnn'"):
        CutPastePatchLocalizer(**{**FAST, "patch_size": 16}).fit(normal)
    with pytest.raises(ConfigError, match="image_size must be in \\[patch_size, 1024\\]"):
        CutPastePatchLocalizer(**{**FAST, "image_size": 28}).fit(normal)
    with pytest.raises(ConfigError, match="shrinkage must be one of 'ledoit-wolf', 'oas' or a number in \\[0, 1\\]"):
        CutPastePatchLocalizer(**{**FAST, "shrinkage": 1.5}).fit(normal)
    with pytest.raises(ConfigError, match="learning_rate must be a number in \\(0, inf\\); got inf"):
        CutPastePatchLocalizer(**{**FAST, "learning_rate": float("inf")}).fit(normal)
    with pytest.raises(ConfigError, match="sigma must be None or a number >= 0; got -1"):
        CutPastePatchLocalizer(**{**FAST, "sigma": -1}).fit(normal)
    with pytest.raises(DataError, match="at least 2"):
        CutPastePatchLocalizer(**FAST).fit(normal[:1])


# ----------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("size,stride", [(64, 8), (70, 8), (40, 3)])
def test_unfold_patches_tile_the_image_row_by_row(size, stride):
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    n, covered = patch_grid(size, 32, stride)
    assert covered >= size > covered - stride
    patches = unfold_patches(images, 32, stride)
    assert patches.shape == (2, n * n, 3, 32, 32)
    for i, j in [(0, 0), (1, n - 2), (n - 2, 1)]:        # patches that lie inside the image
        top, left = i * stride, j * stride
        torch.testing.assert_close(patches[:, i * n + j], images[:, :, top:top + 32, left:left + 32])
    # the last patch ends at the (reflected) border: its top-left part is the image's corner
    inside = size - (n - 1) * stride
    torch.testing.assert_close(patches[:, -1, :, :inside, :inside], images[:, :, -inside:, -inside:])


def test_receptive_field_upsampling_keeps_constants_and_spreads_a_patch_over_its_pixels():
    constant = torch.full((1, 5, 5), 3.0)
    torch.testing.assert_close(receptive_field_upsample(constant, 32, 8, 8.0, 64), torch.full((1, 64, 64), 3.0))
    impulse = torch.zeros(1, 5, 5)
    impulse[0, 2, 1] = 1.0                       # the patch at rows 16-47, columns 8-39
    upsampled = receptive_field_upsample(impulse, 32, 8, 8.0, 64)[0]
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[16:48, 8:40] = True
    assert bool((upsampled[inside] > 0).all()) and bool((upsampled[~inside] == 0).all())
    peak = torch.nonzero(upsampled == upsampled.max())[0].tolist()
    assert 16 <= peak[0] < 48 and 8 <= peak[1] < 40


def test_random_patch_objective_feeds_seeded_crops_of_each_image():
    class Recorder(torch.nn.Module):
        def loss(self, encoder, batch, generator):
            self.batch = batch
            return batch.sum()

    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    crops = []
    for _ in range(2):
        objective = RandomPatchObjective(Recorder(), 32, 5)
        objective.loss(None, images, torch.Generator().manual_seed(7))
        crops.append(objective.objective.batch)
    assert crops[0].shape == (15, 3, 32, 32)
    torch.testing.assert_close(crops[0], crops[1])
    windows = images.unfold(2, 32, 1).unfold(3, 32, 1)           # every 32 x 32 window of each image
    for index, patch in enumerate(crops[0]):
        source = windows[index // 5].permute(1, 2, 0, 3, 4)      # (rows, cols, 3, 32, 32)
        assert bool((source == patch).flatten(2).all(dim=2).any())
