"""Patch localization maps: shape and range, determinism, planted defects, persistence, bounds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from core.errors import Cancelled, ConfigError
from core.explain import PatchLocalizer, image_scores_from_maps
from core.explain.denoise import denoised_candidates
from core.explain.localizer import border_gain, ring_values
from core.explain.smoothing import gaussian_blur
from core.progress import CancelToken, Monitor

SYNTHETIC_SIZE = 96          # working resolution for synthetic images (a 12 x 12 patch grid)
REAL_SIZE = 128              # working resolution for the bottle images (a 16 x 16 patch grid)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two spinning threads make each small
    convolution wait for a time slice (100x slower here); results do not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def stripes(rng: np.random.Generator, height: int = 96, width: int = 112) -> np.ndarray:
    """A normal synthetic image: oblique stripes with a random phase and angle, plus noise."""
    y, x = np.mgrid[0:height, 0:width]
    angle, phase = rng.uniform(0.3, 0.5), rng.uniform(0, 2 * np.pi)
    value = 0.5 + 0.25 * np.sin(0.6 * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    value += rng.normal(0, 0.05, (height, width))
    return np.clip(value * 255, 0, 255).astype(np.uint8)


def plant_square(image: np.ndarray, top: int, left: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Paste a bright, textured (checker + noise) square; returns the ground-truth mask."""
    yy, xx = np.mgrid[0:side, 0:side]
    patch = np.where((yy // 4 + xx // 4) % 2, 255, 190) - rng.integers(0, 30, (side, side))
    region = image[top:top + side, left:left + side]
    region[...] = patch[..., None] if region.ndim == 3 else patch
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def iou_at_true_area(anomaly_map: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the mask with the map's top pixels, as many as the mask has (chance: about area / 2)."""
    predicted = anomaly_map >= np.quantile(anomaly_map, 1.0 - mask.mean())
    return float((predicted & mask).sum() / (predicted | mask).sum())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """16 normal striped images, a defective one (square at rows 30-53, cols 60-83) and its mask."""
    folder = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    normal = []
    for index in range(16):
        path = folder / f"normal_{index:02d}.png"
        Image.fromarray(stripes(rng)).save(path)
        normal.append(path)
    image = stripes(rng)
    mask = plant_square(image, 30, 60, 24, rng)
    defective = folder / "defective.png"
    Image.fromarray(image).save(defective)
    return normal, defective, mask


@pytest.fixture(scope="module")
def fitted(synthetic):
    normal, _, _ = synthetic
    return {method: PatchLocalizer(method, image_size=SYNTHETIC_SIZE, device="cpu", seed=0).fit(normal)
            for method in ("memory", "gaussian")}


@pytest.mark.parametrize("method", ["memory", "gaussian"])
def test_planted_square_is_where_the_synthetic_map_peaks(fitted, synthetic, method):
    _, defective, mask = synthetic
    anomaly_map = fitted[method].anomaly_maps([defective])[0]
    assert mask[np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)]
    assert iou_at_true_area(anomaly_map, mask) > 0.5      # chance is about 0.03
    # normalised for display, the defect stands far above the held-out normal 99th percentile
    assert fitted[method].normalize(anomaly_map)[mask].max() > 2.0


@pytest.mark.parametrize("method", ["memory", "gaussian"])
def test_maps_have_each_input_size_and_are_finite_and_non_negative(fitted, synthetic, tmp_path, method):
    rng = np.random.default_rng(1)
    paths = []
    for height, width in [(50, 70), (130, 61)]:
        path = tmp_path / f"{height}x{width}.jpg"
        Image.fromarray(stripes(rng, height, width)).convert("RGB").save(path)
        paths.append(path)
    maps = fitted[method].anomaly_maps(paths)
    assert [m.shape for m in maps] == [(50, 70), (130, 61)]
    for anomaly_map in maps:
        assert anomaly_map.dtype == np.float32
        assert np.all(np.isfinite(anomaly_map)) and anomaly_map.min() >= 0.0
    assert fitted[method].anomaly_maps(paths, output_size=32)[1].shape == (32, 32)
    assert fitted[method].anomaly_maps(paths, output_size=(20, 30))[0].shape == (20, 30)


def test_same_seed_same_maps_and_another_seed_another_coreset(fitted, synthetic):
    normal, defective, _ = synthetic
    again = PatchLocalizer("memory", image_size=SYNTHETIC_SIZE, device="cpu", seed=0).fit(normal)
    assert torch.equal(again.memory_bank_, fitted["memory"].memory_bank_)
    np.testing.assert_array_equal(again.anomaly_maps([defective])[0], fitted["memory"].anomaly_maps([defective])[0])
    other = PatchLocalizer("memory", image_size=SYNTHETIC_SIZE, device="cpu", seed=1).fit(normal)
    assert not torch.equal(other.memory_bank_, fitted["memory"].memory_bank_)


@pytest.mark.parametrize("method", ["memory", "gaussian"])
def test_save_load_round_trip_gives_the_same_maps(fitted, synthetic, tmp_path, method):
    _, defective, _ = synthetic
    fitted[method].save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch_localizer.json", "patch_localizer.safetensors"]
    loaded = PatchLocalizer.load(tmp_path)
    assert loaded.get_params() == fitted[method].get_params()
    assert loaded.display_scale_ == fitted[method].display_scale_
    np.testing.assert_array_equal(loaded.anomaly_maps([defective])[0], fitted[method].anomaly_maps([defective])[0])
    torch.testing.assert_close(loaded.border_gain_, fitted[method].border_gain_)


def test_a_run_saved_before_the_border_gain_loads_without_one(fitted, synthetic, tmp_path):
    """Its map scores stay those it was fitted with: no gain (weights all ones); its maps are unchanged."""
    from core.arrays import read_arrays, write_arrays
    _, defective, _ = synthetic
    fitted["memory"].save(tmp_path)
    arrays = read_arrays(tmp_path / "patch_localizer.safetensors")
    write_arrays(tmp_path / "patch_localizer.safetensors", {k: v for k, v in arrays.items() if k != "border_gain"})
    old = PatchLocalizer.load(tmp_path)
    assert old.border_gain_ is None and np.all(old.score_weights() == 1.0)
    np.testing.assert_array_equal(old.anomaly_maps([defective])[0], fitted["memory"].anomaly_maps([defective])[0])


def test_border_gain_cools_a_hot_border_and_leaves_a_cool_one():
    size = 32
    rings = ring_values(torch.arange((size + 1) // 2, dtype=torch.float32), size)   # each pixel's distance to the edge
    hot = torch.stack([10.0 + 5.0 * torch.exp(-rings / 2.0) + 0.1 * k for k in range(4)])   # normal maps hot at the edge
    gain = border_gain(hot)
    assert gain[0] < 0.8 and torch.all(gain <= 1.0) and torch.all(gain[-4:] == 1.0)
    assert torch.all(gain[1:] >= gain[:-1]), "the hotter the ring, the lower its gain"
    evened = hot[-1] * ring_values(gain, size)
    assert evened.max() / evened.min() < 1.01, "after the gain, the hottest normal map is flat"
    cool = torch.stack([10.0 - 5.0 * torch.exp(-rings / 3.0)] * 3)                  # a dark frame around an object
    assert torch.all(border_gain(cool) == 1.0), "a cool border is never amplified"


def test_the_map_score_of_normal_images_is_not_read_from_the_border(synthetic, fitted):
    """Held-out normal maps peak in the outer ring (the padded border patches); weighed by the localizer's
    score weights, fewer of their peaks lie there, and the weights only ever lower a value."""
    normal, _, _ = synthetic
    size = SYNTHETIC_SIZE
    outer = (ring_values(torch.arange((size + 1) // 2, dtype=torch.float32), size) < size // 8).numpy()
    localizer = clone(fitted["memory"]).fit(normal[:12])
    maps = localizer.anomaly_maps(normal[12:], output_size=size)
    weights = localizer.score_weights()
    assert weights.shape == (size, size) and weights.max() <= 1.0 and weights[outer].min() < 1.0
    raw = np.mean([outer.flat[int(np.argmax(m))] for m in maps])
    weighed = np.mean([outer.flat[int(np.argmax(m * weights))] for m in maps])
    assert raw > outer.mean() and weighed < raw


def test_memory_is_bounded_by_the_pool_and_the_coreset(synthetic):
    normal, _, _ = synthetic
    localizer = PatchLocalizer("memory", image_size=SYNTHETIC_SIZE, device="cpu", coreset_size=50,
                               coreset_ratio=0.5, max_pool_patches=300).fit(normal)
    # 16 images, 2 held out (display scale): 14 fitted, ceil(300 / 14) = 22 of 144 patches each
    pool = localizer.n_train_images_ * math.ceil(300 / localizer.n_train_images_)
    assert localizer.n_train_images_ == 14 and pool == 308
    assert localizer.memory_bank_.shape == (50, 472)       # layers="auto": stride 8, 16 and 32 for memory
    small = PatchLocalizer("memory", image_size=SYNTHETIC_SIZE, device="cpu", coreset_ratio=0.01,
                           max_pool_patches=300).fit(normal)
    assert small.memory_bank_.shape[0] == math.ceil(0.01 * pool)


def contaminated_training(normal: list, folder) -> list:
    """The normal training images with the first one replaced by a copy carrying a planted square."""
    contaminated = folder / "contaminated.png"
    image = np.array(Image.open(normal[0]))
    plant_square(image, 30, 60, 24, np.random.default_rng(0))
    Image.fromarray(image).save(contaminated)
    return [contaminated, *normal[1:]]


def test_a_defect_in_one_training_image_does_not_make_itself_normal(synthetic, tmp_path):
    """The same planted square in one training image: plain nearest neighbour learns it as normal,
    the default support_images=2 does not."""
    normal, defective, mask = synthetic
    training = contaminated_training(normal, tmp_path)
    maps = {support: PatchLocalizer(image_size=SYNTHETIC_SIZE, device="cpu", support_images=support)
            .fit(training).anomaly_maps([defective])[0] for support in (1, 2)}
    assert maps[2][mask].max() > 3.0 * maps[1][mask].max()
    assert mask[np.unravel_index(np.argmax(maps[2]), maps[2].shape)]
    assert not mask[np.unravel_index(np.argmax(maps[1]), maps[1].shape)]


def test_denoising_drops_the_defect_patches_of_a_contaminated_training_image(synthetic, tmp_path):
    """The same planted square in one training image, plain nearest neighbour (support_images=1):
    without denoising the square is learnt as normal; dropping the most outlying 5 % of the candidate
    patches (the square covers about 2 % of them) removes it from the memory."""
    normal, defective, mask = synthetic
    training = contaminated_training(normal, tmp_path)
    maps = {share: PatchLocalizer(image_size=SYNTHETIC_SIZE, device="cpu", support_images=1, denoise=share)
            .fit(training).anomaly_maps([defective])[0] for share in (0.0, 0.05)}
    assert maps[0.05][mask].max() > 3.0 * maps[0.0][mask].max()
    assert mask[np.unravel_index(np.argmax(maps[0.05]), maps[0.05].shape)]


def test_denoised_candidates_drop_the_patches_no_other_image_shares():
    rng = np.random.default_rng(0)
    normal = torch.from_numpy(rng.normal(0, 1, (200, 8))).float()
    odd = torch.from_numpy(rng.normal(6, 1, (10, 8))).float()          # all from one image
    pool = torch.cat([normal, odd])
    owners = torch.cat([torch.arange(200) % 20, torch.full((10,), 20)])
    kept = denoised_candidates(pool, owners, 10 / 210, 1, np.random.default_rng(0))
    assert kept.tolist() == list(range(200))
    assert denoised_candidates(pool, owners, 0.0, 1, np.random.default_rng(0)).tolist() == list(range(210))


def test_layers_and_neighbourhood_set_the_patch_features(fitted, synthetic, tmp_path):
    """Three layers concatenate 40 + 112 + 320 channels on the stride-8 grid; the choice survives
    save and load (JSON keeps the tuple as a list). ``auto`` is all three for memory, stride 8 and 16
    for gaussian."""
    assert fitted["memory"].n_features_ == 472 and fitted["gaussian"].n_features_ == 152
    normal, defective, _ = synthetic
    localizer = PatchLocalizer(image_size=SYNTHETIC_SIZE, device="cpu", layers=("stride8", "stride16", "stride32"),
                               neighbourhood=5).fit(normal)
    assert localizer.n_features_ == 472 and localizer.grid_shape_ == (12, 12)
    localizer.save(tmp_path)
    loaded = PatchLocalizer.load(tmp_path)
    assert loaded.get_params() == localizer.get_params()
    np.testing.assert_array_equal(loaded.anomaly_maps([defective])[0], localizer.anomaly_maps([defective])[0])
    coarse = PatchLocalizer(image_size=SYNTHETIC_SIZE, device="cpu", layers=("stride16",), neighbourhood=1).fit(normal)
    assert coarse.n_features_ == 112 and coarse.grid_shape_ == (6, 6)


def test_image_scores_from_maps():
    maps = [np.arange(100, dtype=np.float32).reshape(10, 10), np.zeros((4, 5), np.float32)]
    np.testing.assert_array_equal(image_scores_from_maps(maps), [99.0, 0.0])
    np.testing.assert_allclose(image_scores_from_maps(maps, "topk_mean", topk_fraction=0.05), [97.0, 0.0])
    with pytest.raises(ConfigError, match="reduce must be one of 'max', 'topk_mean'"):
        image_scores_from_maps(maps, "mean")


def test_gaussian_blur_keeps_mass_and_a_constant_map():
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1.0
    blurred = gaussian_blur(impulse, 2.0)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(torch.argmax(blurred)) == 20 * 41 + 20
    constant = torch.full((1, 10, 7), 3.0)       # smaller than the kernel: replicated borders
    torch.testing.assert_close(gaussian_blur(constant, 4.0), constant)


def test_progress_cancel_and_validation(synthetic):
    normal, _, _ = synthetic
    with pytest.raises(NotFittedError):
        PatchLocalizer(device="cpu").anomaly_maps(normal[:1])
    with pytest.raises(ConfigError, match="PatchLocalizer: method must be one of 'memory', 'gaussian'; got 'knn'"):
        PatchLocalizer("knn", device="cpu").fit(normal)
    with pytest.raises(ConfigError, match="coreset_ratio must be a number in \\(0, 1\\]; got 0"):
        PatchLocalizer(coreset_ratio=0, device="cpu").fit(normal)
    with pytest.raises(ConfigError, match="image_size must be an int in \\[32, 1024\\]; got 224.0"):
        PatchLocalizer(image_size=224.0, device="cpu").fit(normal)
    with pytest.raises(ConfigError, match="neighbourhood must be one of 1, 3, 5, 7; got 4"):
        PatchLocalizer(neighbourhood=4, device="cpu").fit(normal)
    with pytest.raises(ConfigError, match="layers must be 'auto' or a non-empty tuple"):
        PatchLocalizer(layers=("head",), device="cpu").fit(normal)
    with pytest.raises(ConfigError, match="denoise must be a number in \\[0, 0.5\\); got 0.5"):
        PatchLocalizer(denoise=0.5, device="cpu").fit(normal)
    token = CancelToken()
    events = []

    def on_progress(event):
        events.append(event)
        token.cancel()

    with pytest.raises(Cancelled):
        PatchLocalizer(image_size=SYNTHETIC_SIZE, device="cpu", batch_size=4).fit(
            normal, monitor=Monitor(on_progress, token))
    assert [(e.stage, e.done, e.total) for e in events] == [("patch_fit", 4, 14)]


def test_a_localizer_is_a_scikit_learn_estimator(fitted):
    """Parameters stored as given, fitted state in trailing-underscore attributes, clone unfitted."""
    localizer = PatchLocalizer("gaussian", image_size=SYNTHETIC_SIZE, sigma=2.0, seed=3)
    assert localizer.get_params()["sigma"] == 2.0 and localizer.get_params()["method"] == "gaussian"
    assert not [name for name in vars(localizer) if name.endswith("_")]
    copy = clone(fitted["memory"])
    assert copy.get_params() == fitted["memory"].get_params()
    assert not hasattr(copy, "memory_bank_") and hasattr(fitted["memory"], "memory_bank_")
    assert repr(localizer).startswith("PatchLocalizer(")


@pytest.mark.realdata
@pytest.mark.parametrize("method", ["memory", "gaussian"])
def test_planted_square_on_a_real_bottle_image(shared_data, tmp_path, method):
    good = sorted((shared_data("mvtec_ad_bottle_256", "bottle", "train", "good")).glob("*.png"))
    train, held_out = good[:20], good[30]
    image = np.array(Image.open(held_out).convert("RGB"))
    mask = plant_square(image, 150, 70, 36, np.random.default_rng(0))
    defective = tmp_path / "bottle_defective.png"
    Image.fromarray(image).save(defective)
    localizer = PatchLocalizer(method, image_size=REAL_SIZE, device="cpu", seed=0).fit(train)
    anomaly_map, untouched = localizer.anomaly_maps([defective, held_out])
    assert anomaly_map.shape == image.shape[:2]
    assert mask[np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)]
    assert iou_at_true_area(anomaly_map, mask) > 0.4       # chance is about 0.01
    assert anomaly_map.max() > 1.5 * untouched.max()


def test_a_gaussian_fit_larger_than_free_memory_is_refused_before_it_starts(synthetic, monkeypatch):
    normal, _, _ = synthetic
    monkeypatch.setattr("core.explain.patch.available_memory_bytes", lambda: 2**20)   # 1 MiB free
    with pytest.raises(ConfigError, match="localization 'gaussian' needs about .* GiB .* use localization 'memory'"):
        PatchLocalizer("gaussian", image_size=SYNTHETIC_SIZE, device="cpu").fit(normal)
