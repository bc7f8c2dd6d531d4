"""Self-supervised objectives: augmentations keep their promises, losses are right and trainable."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.transforms import functional as TF

from core.errors import ConfigError, DataError
from core.models.objectives import (
    OBJECTIVES,
    color_jitter,
    cutpaste,
    default_crop_scale,
    image_view,
    imix_nt_xent,
    make_objective,
    mix_inputs,
    nt_xent,
    rotate_batch,
    rotate_each,
    scar,
    scar_size_range,
    table_view,
)
from core.models.objectives.color import adjust_contrast, adjust_hue, adjust_saturation

EMBEDDING_DIM = 16
FEATURES = 6


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_images(size: int, count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=gen(seed))


def mask_boxes(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(width, height) of the bounding box of each ``(B, 1, H, W)`` mask."""
    boxes = []
    for one in mask[:, 0]:
        rows, cols = one.any(dim=1).nonzero(), one.any(dim=0).nonzero()
        boxes.append((int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)))
    return boxes


# --- CutPaste and scar ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_cutpaste_pastes_one_rectangle_of_2_to_15_percent(size):
    images = noise_images(size)
    out, mask = cutpaste(images, gen(1))
    assert out.shape == images.shape and mask.shape == (8, 1, size, size) and mask.dtype == torch.bool
    assert torch.equal(out[~mask.expand_as(out)], images[~mask.expand_as(images)])
    share = mask.sum(dim=(1, 2, 3)).double() / size**2
    assert (share >= 0.02 - 1e-9).all() and (share <= 0.15 + 1e-9).all()
    for (width, height), area in zip(mask_boxes(mask), mask.sum(dim=(1, 2, 3))):
        assert width * height == area  # a full axis-aligned rectangle
        assert 0.3 - 1e-9 <= width / height <= 3.3 + 1e-9
    changed = (out != images).any(dim=1, keepdim=True)
    assert changed[mask].float().mean() > 0.9  # pasted noise differs from what it covers


def test_cutpaste_patch_sizes_vary_over_the_allowed_range():
    _, mask = cutpaste(noise_images(64, count=64), gen(2))
    share = mask.sum(dim=(1, 2, 3)).double() / 64**2
    aspect = torch.tensor([w / h for w, h in mask_boxes(mask)])
    assert share.min() < 0.05 and share.max() > 0.11
    assert aspect.min() < 0.6 and aspect.max() > 1.7


@pytest.mark.parametrize("size", [32, 64])
def test_upright_scar_is_a_thin_rectangle_within_the_scaled_ranges(size):
    images = noise_images(size)
    out, mask = scar(images, gen(3), max_angle=0.0)
    (w_lo, w_hi), (l_lo, l_hi) = scar_size_range(size, size)
    for (width, length), area in zip(mask_boxes(mask), mask.sum(dim=(1, 2, 3))):
        assert width * length == area
        assert w_lo <= width <= w_hi and l_lo <= length <= l_hi
    assert torch.equal(out[~mask.expand_as(out)], images[~mask.expand_as(images)])


def test_rotated_scar_changes_only_its_own_thin_region():
    size = 64
    images = noise_images(size, count=16)
    out, mask = scar(images, gen(4))
    (_, w_hi), (_, l_hi) = scar_size_range(size, size)
    assert torch.equal(out[~mask.expand_as(out)], images[~mask.expand_as(images)])
    half_diagonal = math.hypot(w_hi, l_hi) / 2
    for one in mask[:, 0]:
        points = one.nonzero().double()
        assert 1 <= len(points) <= (w_hi + 1) * (l_hi + 1)
        assert (points - points.mean(dim=0)).norm(dim=1).max() <= half_diagonal + 1.0
    tilted = [w * h > area for (w, h), area in zip(mask_boxes(mask), mask.sum(dim=(1, 2, 3)))]
    assert any(tilted)  # some scars really are rotated


def test_scar_sizes_follow_the_paper_at_256_px_and_shrink_with_the_image():
    assert scar_size_range(256, 256) == ((2, 16), (10, 25))
    assert scar_size_range(32, 32) == ((1, 2), (3, 3))
    assert scar_size_range(64, 48) == scar_size_range(48, 48)


def test_augmentations_repeat_with_the_same_seed_and_differ_with_another():
    images = noise_images(32)
    rows = torch.randn(8, FEATURES, generator=gen(0))
    for augment in (
        lambda g: cutpaste(images, g)[0],
        lambda g: scar(images, g)[0],
        lambda g: image_view(images, g),
        lambda g: rotate_each(images, g)[0],
        lambda g: table_view(rows, g),
    ):
        assert torch.equal(augment(gen(7)), augment(gen(7)))
        assert not torch.equal(augment(gen(7)), augment(gen(8)))


# --- rotations -----------------------------------------------------------------------------


def test_rotations_are_exact_and_labelled():
    images = noise_images(16, count=3)
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (12, 3, 16, 16)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for k in range(4):
        assert torch.equal(rotated[3 * k : 3 * k + 3], torch.rot90(images, k, dims=(-2, -1)))
    turned = images
    for _ in range(4):
        turned = torch.rot90(turned, 1, dims=(-2, -1))
    assert torch.equal(turned, images)


def test_rotate_each_applies_the_reported_turn():
    images = noise_images(16, count=40)
    rotated, turns = rotate_each(images, gen(5))
    assert set(turns.tolist()) == {0, 1, 2, 3}
    for image, turn, out in zip(images, turns, rotated):
        assert torch.equal(out, torch.rot90(image, int(turn), dims=(-2, -1)))


def test_rotations_need_square_images():
    with pytest.raises(DataError, match="square"):
        rotate_batch(torch.rand(2, 3, 16, 24))


# --- views and colour ----------------------------------------------------------------------


def test_colour_ops_match_torchvision_per_image():
    images = noise_images(12, count=4)
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    shifts = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    for ours, theirs, values in (
        (adjust_contrast, TF.adjust_contrast, factors),
        (adjust_saturation, TF.adjust_saturation, factors),
        (adjust_hue, TF.adjust_hue, shifts),
    ):
        expected = torch.stack([theirs(image, float(v)) for image, v in zip(images, values)])
        torch.testing.assert_close(ours(images, values), expected, atol=1e-5, rtol=0)


def test_views_differ_from_each_other_and_keep_shape_and_range():
    images = noise_images(32)
    first, second = image_view(images, gen(1)), image_view(images, gen(2))
    assert first.shape == second.shape == images.shape
    assert first.min() >= 0 and first.max() <= 1
    assert not torch.allclose(first, second)
    jittered = color_jitter(images, gen(1))
    assert jittered.shape == images.shape and not torch.allclose(jittered, images)


def test_crop_scale_is_milder_for_small_images():
    assert default_crop_scale(32, 32) == (0.5, 1.0)
    assert default_crop_scale(224, 224) == (0.08, 1.0)


def test_table_views_mask_a_share_of_features_and_add_noise():
    rows = torch.randn(64, 50, generator=gen(0)) + 5.0  # far from 0, so masked entries stand out
    view = table_view(rows, gen(1), noise_std=0.1)
    assert view.shape == rows.shape
    masked_share = (view.abs() < 1.0).float().mean()
    assert 0.2 <= masked_share <= 0.4
    kept = view.abs() >= 1.0
    assert 0.05 < (view - rows)[kept].std() < 0.15


# --- losses --------------------------------------------------------------------------------


def test_nt_xent_equals_the_hand_computed_value():
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    second = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # normalised: (1, 1)/sqrt(2) and (0, 1)
    temperature = 0.5
    views = [(1.0, 0.0), (0.0, 1.0), (2**-0.5, 2**-0.5), (0.0, 1.0)]
    positive = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i, anchor in enumerate(views):
        sims = {j: (anchor[0] * v[0] + anchor[1] * v[1]) / temperature for j, v in enumerate(views) if j != i}
        total += -sims[positive[i]] + math.log(sum(math.exp(s) for s in sims.values()))
    assert nt_xent(first, second, temperature).item() == pytest.approx(total / 4, rel=1e-6)


def test_nt_xent_is_lower_for_matching_pairs_than_for_shuffled_ones():
    first = torch.randn(8, 4, generator=gen(0))
    second = first + 0.05 * torch.randn(8, 4, generator=gen(1))
    assert nt_xent(first, second) < nt_xent(first, second.roll(1, dims=0))


def test_imix_loss_reduces_to_n_pair_and_mixes_labels():
    anchors, positives = torch.randn(6, 4, generator=gen(0)), torch.randn(6, 4, generator=gen(1))
    identity, permutation = torch.arange(6), torch.tensor([3, 4, 5, 0, 1, 2])
    a, p = nn.functional.normalize(anchors, dim=1), nn.functional.normalize(positives, dim=1)
    logits = a @ p.T / 0.2
    plain = nn.functional.cross_entropy(logits, identity)
    assert imix_nt_xent(anchors, positives, permutation, 1.0).item() == pytest.approx(plain.item(), rel=1e-6)
    mixed = 0.3 * plain + 0.7 * nn.functional.cross_entropy(logits, permutation)
    assert imix_nt_xent(anchors, positives, permutation, 0.3).item() == pytest.approx(mixed.item(), rel=1e-6)


def test_mix_inputs_is_a_convex_combination_of_two_batch_members():
    rows = torch.randn(8, FEATURES, generator=gen(0))
    mixed, permutation, lam = mix_inputs(rows, gen(1))
    assert 0.0 <= lam <= 1.0 and sorted(permutation.tolist()) == list(range(8))
    torch.testing.assert_close(mixed, lam * rows + (1 - lam) * rows[permutation])


# --- objectives end to end -----------------------------------------------------------------


def image_encoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, EMBEDDING_DIM),
    )


def table_encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, EMBEDDING_DIM))


CASES = [(name, kind) for name, kinds in OBJECTIVES.items() for kind in kinds]


def encoder_and_batch(kind: str, image_size: int) -> tuple[nn.Module, torch.Tensor]:
    """A seeded small encoder for ``kind`` and a fixed batch of 8 noise images or table rows."""
    torch.manual_seed(0)
    if kind == "images":
        return image_encoder(), noise_images(image_size)
    return table_encoder(), torch.randn(8, FEATURES, generator=gen(0))


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(name, kind):
    encoder, batch = encoder_and_batch(kind, image_size=32)
    objective = make_objective(name, EMBEDDING_DIM, kind, head_dims=(32,))
    assert objective.name == name
    optimizer = torch.optim.Adam([*encoder.parameters(), *objective.parameters()], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = objective.loss(encoder, batch, gen(0))  # same augmentation every step
        assert loss.ndim == 0 and torch.isfinite(loss)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_default_options_give_a_finite_reproducible_loss(name, kind):
    encoder, batch = encoder_and_batch(kind, image_size=64)
    objective = make_objective(name, EMBEDDING_DIM, kind)
    first, second = objective.loss(encoder, batch, gen(3)), objective.loss(encoder, batch, gen(3))
    assert torch.isfinite(first) and first.item() == second.item()


def test_imix_changes_the_loss():
    torch.manual_seed(0)
    encoder, images = image_encoder(), noise_images(32)
    plain = make_objective("contrastive", EMBEDDING_DIM, "images")
    mixed = make_objective("contrastive-imix", EMBEDDING_DIM, "images")
    mixed.load_state_dict(plain.state_dict())
    loss_plain, loss_mixed = plain.loss(encoder, images, gen(0)), mixed.loss(encoder, images, gen(0))
    assert torch.isfinite(loss_mixed) and loss_mixed.item() != pytest.approx(loss_plain.item())


# --- errors --------------------------------------------------------------------------------


def test_make_objective_rejects_what_it_cannot_build():
    with pytest.raises(ConfigError, match="cutpaste, cutpaste-binary"):
        make_objective("jigsaw", EMBEDDING_DIM, "images")
    with pytest.raises(ConfigError, match="images only.*contrastive, contrastive-imix"):
        make_objective("cutpaste", EMBEDDING_DIM, "table")
    with pytest.raises(ConfigError, match="images only"):
        make_objective("rotation", EMBEDDING_DIM, "table")
    with pytest.raises(ConfigError, match="images, table"):
        make_objective("contrastive", EMBEDDING_DIM, "audio")
    with pytest.raises(ConfigError, match="allowed: .*temperature"):
        make_objective("contrastive", EMBEDDING_DIM, "table", temprature=0.5)
    with pytest.raises(ConfigError, match="contrastive.*fixes imix"):
        make_objective("contrastive", EMBEDDING_DIM, "images", imix=True)
    with pytest.raises(ConfigError, match="variant"):
        make_objective("cutpaste", EMBEDDING_DIM, "images", variant="scar")
    with pytest.raises(ConfigError, match="temperature"):
        make_objective("contrastive", EMBEDDING_DIM, "images", temperature=0)
    with pytest.raises(ConfigError, match="embedding_dim"):
        make_objective("rotation", 0, "images")
    with pytest.raises(ConfigError, match="crop_scale"):
        make_objective("contrastive", EMBEDDING_DIM, "images", crop_scale=(0.9, 0.1))
    assert make_objective("contrastive-imix", EMBEDDING_DIM, "table", imix=True).imix


def test_objectives_reject_batches_of_the_wrong_form():
    torch.manual_seed(0)
    encoder = image_encoder()
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        make_objective("cutpaste", EMBEDDING_DIM, "images").loss(encoder, torch.rand(8, 1, 32, 32), gen())
    with pytest.raises(DataError, match="too small"):
        make_objective("rotation", EMBEDDING_DIM, "images").loss(encoder, torch.rand(8, 3, 4, 4), gen())
    with pytest.raises(DataError, match="at least 2"):
        make_objective("contrastive", EMBEDDING_DIM, "images").loss(encoder, torch.rand(1, 3, 32, 32), gen())
    with pytest.raises(DataError, match=r"\(B, F\)"):
        make_objective("contrastive", EMBEDDING_DIM, "table").loss(table_encoder(), torch.rand(8, 3, 2), gen())
    with pytest.raises(ConfigError, match="embedding"):
        make_objective("rotation", EMBEDDING_DIM + 1, "images").loss(encoder, torch.rand(2, 3, 32, 32), gen())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_generator_gives_the_same_augmentations_on_the_gpu_and_losses_train_under_amp():
    images, rows = noise_images(64), torch.randn(8, FEATURES, generator=gen(0))
    cuda = torch.device("cuda")
    for augment in (
        lambda b, g: cutpaste(b, g)[1],
        lambda b, g: scar(b, g, max_angle=0.0)[1],
        lambda b, g: rotate_each(b, g)[0],
    ):
        assert torch.equal(augment(images, gen(1)), augment(images.to(cuda), gen(1)).cpu())
    on_cpu, on_gpu = scar(images, gen(1))[1], scar(images.to(cuda), gen(1))[1].cpu()
    assert (on_cpu != on_gpu).sum() <= 0.05 * on_cpu.sum()  # cos/sin may differ in the last bit
    for augment, batch in ((lambda b, g: cutpaste(b, g)[0], images), (image_view, images), (table_view, rows)):
        torch.testing.assert_close(augment(batch, gen(1)), augment(batch.to(cuda), gen(1)).cpu(), atol=1e-4, rtol=0)
    cuda_generator = torch.Generator(device=cuda).manual_seed(0)
    for name, kind in CASES:
        torch.manual_seed(0)
        encoder = (image_encoder() if kind == "images" else table_encoder()).to(cuda)
        batch = (images if kind == "images" else rows).to(cuda)
        objective = make_objective(name, EMBEDDING_DIM, kind).to(cuda)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.loss(encoder, batch, cuda_generator)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
