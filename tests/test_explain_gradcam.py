"""Grad-CAM of the anomaly score: differentiable target, hook-free afterwards, shapes, localisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.detectors import GaussianDensity
from core.errors import ConfigError, DataError
from core.explain.gradcam import MahalanobisTarget, ScoreExplainer, find_target_layer
from core.models.efficientnet import EfficientNetFeatures, normalize_images
from core.models.pretrained import load_backbone

LAYERS = ("stride16", "stride32")
SIZE = 224  # the default image_size; the planted-square claim below is made at this size
SQUARE = 32


def _textures(rng, n, size=SIZE):
    """Smooth gray noise textures ``(n, size, size, 3) uint8``: a stand-in for a defect-free surface."""
    out = []
    for _ in range(n):
        coarse = Image.fromarray(np.clip(rng.normal(128, 12, (16, 16, 3)), 0, 255).astype(np.uint8))
        fine = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)) + rng.normal(0, 6, (size, size, 3))
        out.append(np.clip(fine, 0, 255).astype(np.uint8))
    return np.stack(out)


def _embed(model, pixels):
    batch = normalize_images(torch.from_numpy(pixels)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model.pooled(batch, LAYERS).numpy()


@pytest.fixture(scope="module")
def backbone():
    """The cached, shared backbone the engine uses (channels-last on the CPU)."""
    return load_backbone("efficientnet-lite0", SIZE, "cpu")


@pytest.fixture(scope="module")
def gde(backbone):
    """Fitted once for the module (32 images through the backbone); tests only read it."""
    return GaussianDensity().fit(_embed(backbone, _textures(np.random.default_rng(0), 32)))


@pytest.fixture
def planted():
    """Textures with a bright square each, and the square's mask; new arrays for every test."""
    rng = np.random.default_rng(1)
    images = _textures(rng, 6)
    masks = np.zeros(images.shape[:3], bool)
    for image, mask in zip(images, masks):
        y, x = rng.integers(0, SIZE - SQUARE, size=2)
        image[y : y + SQUARE, x : x + SQUARE] = 250
        mask[y : y + SQUARE, x : x + SQUARE] = True
    return images, masks


def _hooks(module):
    return [
        *module._forward_hooks.values(), *module._forward_pre_hooks.values(),
        *module._backward_hooks.values(), *module._backward_pre_hooks.values(),
    ]


def _state(model):
    return {
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
    }


def _same_state(before, after):
    return (
        before["modes"] == after["modes"]
        and before["requires_grad"] == after["requires_grad"]
        and before["grads"] == after["grads"]
        and all(torch.equal(a, b) for a, b in zip(before["buffers"], after["buffers"]))
    )


def test_target_is_the_gde_score_and_differentiable(backbone, gde):
    embeddings = _embed(backbone, _textures(np.random.default_rng(2), 3))
    target = MahalanobisTarget(gde.location_, gde.precision_)
    assert target(torch.from_numpy(embeddings)).numpy() == pytest.approx(-gde.score_samples(embeddings), rel=1e-6)

    x = torch.from_numpy(embeddings[0]).requires_grad_()
    target(x).backward()
    expected = 2 * gde.precision_ @ (embeddings[0].astype(np.float64) - gde.location_)
    assert torch.isfinite(x.grad).all()
    assert x.grad.numpy() == pytest.approx(expected, rel=1e-4, abs=1e-6 * float(np.abs(expected).max()))


@pytest.mark.parametrize("log", [False, True])
def test_target_passes_gradcheck(log):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 5))
    target = MahalanobisTarget(rng.normal(size=5), a @ a.T + np.eye(5), log=log)
    x = torch.from_numpy(rng.normal(size=(2, 5))).requires_grad_()
    assert torch.autograd.gradcheck(target, (x,))


def test_default_target_layer_is_the_deepest_pooled_stage(backbone):
    assert find_target_layer(backbone, LAYERS) is backbone.net._blocks[backbone.stage_ends["stride32"]]
    assert find_target_layer(backbone, LAYERS, "stride16") is backbone.net._blocks[backbone.stage_ends["stride16"]]
    assert find_target_layer(backbone, ("stride8", "head")) is backbone.net._bn1
    with pytest.raises(ConfigError, match="pooled layers"):
        find_target_layer(backbone, ("stride16",), "stride32")  # the forward pass would stop before it
    with pytest.raises(ConfigError, match="must be one of"):
        ScoreExplainer(backbone, LAYERS, np.zeros(432), np.eye(432), method="cam")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_explain_leaves_no_hook_and_restores_mode_and_flags(method):
    """A fresh model in an unusual state: train mode, some parameters frozen, others not."""
    model = EfficientNetFeatures("efficientnet-lite0", 64).train()
    for index, p in enumerate(model.parameters()):
        p.requires_grad_(index % 2 == 0)
    rng = np.random.default_rng(4)
    d = 112 + 320
    before = _state(model)
    with ScoreExplainer(model, LAYERS, rng.normal(size=d), np.eye(d), method=method) as explainer:
        assert any(_hooks(m) for m in model.modules())
        maps = explainer.explain(_textures(rng, 2, size=64), image_size=64)
    assert all(np.isfinite(m).all() and m.max() > 0 for m in maps)
    assert not any(_hooks(m) for m in model.modules())
    assert _same_state(before, _state(model))  # batch-norm statistics included: it ran in eval mode


def test_hooks_are_released_when_the_block_raises(backbone, gde, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        with ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_) as explainer:
            explainer.explain([np.zeros((8, 8, 3), np.float32)], SIZE)
    assert not any(_hooks(m) for m in backbone.modules())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_).explain([broken], SIZE)
    assert not any(_hooks(m) for m in backbone.modules())


def test_maps_have_each_inputs_original_size(backbone, gde, tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for index, (h, w) in enumerate([(300, 200), (97, 411)]):
        path = tmp_path / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    gray = rng.integers(0, 256, (50, 60), dtype=np.uint8)
    with ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_, batch_size=2) as explainer:
        maps = explainer.explain([*paths, gray], SIZE)
        batch_maps = explainer.explain(_textures(rng, 3), SIZE)
    assert [m.shape for m in maps] == [(300, 200), (97, 411), (50, 60)]
    assert [m.shape for m in batch_maps] == [(SIZE, SIZE)] * 3
    assert all(m.dtype == np.float32 and np.all(m >= 0) and np.isfinite(m).all() for m in maps + batch_maps)


def test_explain_is_deterministic_and_works_under_inference_mode(backbone, gde, planted):
    images, _ = planted
    first = ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_).explain(images[:2], SIZE)
    with torch.inference_mode():  # how the app and the CLI run the backbone
        explainer = ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_)
        second = explainer.explain(images[:2], SIZE)  # opens and closes its own hooks
        third = explainer.explain(images[:2], SIZE)
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(first, second, third))
    assert not any(_hooks(m) for m in backbone.modules())


def test_a_more_anomalous_image_gets_a_larger_map(backbone, gde):
    """Maps are unnormalised: a planted square raises both the score and the map's mass."""
    clean = _textures(np.random.default_rng(6), 1)
    defect = clean.copy()
    defect[0, 100:140, 100:140] = 250
    clean_map, defect_map = ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_).explain(
        np.concatenate([clean, defect]), SIZE
    )
    assert defect_map.sum() > 2 * clean_map.sum()


def test_channels_last_and_contiguous_models_agree():
    model = EfficientNetFeatures("efficientnet-lite0", 64).eval()
    images = _textures(np.random.default_rng(7), 2, size=64)
    d = 112 + 320
    location = _embed(model, images).mean(axis=0) + 0.1

    def maps():
        return ScoreExplainer(model, LAYERS, location, np.eye(d)).explain(images, 64)

    contiguous = maps()
    model.to(memory_format=torch.channels_last)
    channels_last = maps()
    for a, b in zip(contiguous, channels_last):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4 * float(a.max()))  # approx takes no float32


def test_inference_passes_of_other_users_are_not_recorded(backbone, gde, planted):
    """The backbone is shared: an embedding pass while an explainer is open must not leak into it."""
    images, _ = planted
    with ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_) as explainer:
        before = explainer.explain(images[:1], SIZE)
        _embed(backbone, images[:1])
        assert explainer._cam.activations_and_grads.activations == []
        after = explainer.explain(images[:1], SIZE)
    assert np.array_equal(before[0], after[0])


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_planted_square_is_where_the_map_is_high(backbone, gde, planted, method):
    """At 224 px the stride-32 map has 7 x 7 cells, about one per 32 px square: the map's peak may land
    a cell away, so the claim is about regions. Taking the square's area of highest map values, its
    IoU with the square must beat chance (the square's share of the image, 2%) by a wide margin on
    every image, and the map must be higher on the square than off it. Measured on these images:
    IoU 0.13-0.56 (both methods), mean map 4-8x higher on the square than off it."""
    images, masks = planted
    with ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_, method=method) as explainer:
        maps = explainer.explain(images, SIZE)
    chance = masks[0].mean()
    ious = []
    for amap, mask in zip(maps, masks):
        top = amap >= np.quantile(amap, 1 - mask.mean())
        ious.append((top & mask).sum() / (top | mask).sum())
        assert amap[mask].mean() > 2 * amap[~mask].mean()
    assert min(ious) > 4 * chance
    assert np.mean(ious) > 10 * chance


def test_shared_backbone_is_left_as_it_was(backbone, gde):
    """The cached backbone the engine shares, after an explainer used outside a ``with`` block and
    inside one that raises: in eval mode, its flags and buffers as they were, no gradient, no hook."""
    images = _textures(np.random.default_rng(8), 1)
    before = _state(backbone)
    explainer = ScoreExplainer(backbone, LAYERS, gde.location_, gde.precision_)
    explainer.explain(images, SIZE)
    with pytest.raises(ValueError, match="uint8"), explainer:
        explainer.explain(images, SIZE)
        explainer.explain([np.zeros((8, 8, 3), np.float32)], SIZE)
    assert _same_state(before, _state(backbone))
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.parameters())  # load_backbone leaves them on
    assert all(p.grad is None for p in backbone.parameters())
    assert not any(_hooks(m) for m in backbone.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_match_cpu_maps(gde, planted):
    images, _ = planted
    cpu = ScoreExplainer(load_backbone("efficientnet-lite0", SIZE, "cpu"), LAYERS, gde.location_, gde.precision_)
    cuda = ScoreExplainer(load_backbone("efficientnet-lite0", SIZE, "cuda"), LAYERS, gde.location_, gde.precision_)
    for a, b in zip(cpu.explain(images[:2], SIZE), cuda.explain(images[:2], SIZE)):
        assert b.shape == a.shape
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
