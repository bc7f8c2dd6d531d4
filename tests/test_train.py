"""The training loop: loss falls, determinism, resume, non-finite guard, cancel, progress, CUDA."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import Cancelled, ConfigError, DataError, RunError, TrainingError
from core.models.backbones import make_backbone
from core.checkpoints import CHECKPOINT_FILE
from core.progress import CancelToken, Monitor
from core.train import TrainConfig, cosine_schedule, train

SIZE = 32


class RotationObjective(nn.Module):
    """Stand-in objective: predict which multiple of 90 degrees each image was rotated by."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(embedding_dim, 4)
        self.batch_sizes: list[int] = []
        self.seeds: list[int] = []

    def loss(self, encoder, batch, generator):
        self.batch_sizes.append(len(batch))
        self.seeds.append(generator.initial_seed())
        turns = torch.randint(0, 4, (len(batch),), generator=generator)
        rotated = torch.stack([torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(batch, turns)])
        return F.cross_entropy(self.head(encoder(rotated)), turns.to(batch.device))


class DenoiseObjective(nn.Module):
    """Stand-in objective for tables: reconstruct a row from a noisy copy."""

    def __init__(self, embedding_dim: int, n_features: int) -> None:
        super().__init__()
        self.head = nn.Linear(embedding_dim, n_features)

    def loss(self, encoder, batch, generator):
        noise = torch.randn(batch.shape, generator=generator).to(batch.device)
        return F.mse_loss(self.head(encoder(batch + 0.3 * noise)), batch)


class NaNAfter(RotationObjective):
    """Returns NaN from its ``calls``-th call on."""

    calls = 3

    def loss(self, encoder, batch, generator):
        value = super().loss(encoder, batch, generator)
        return value * float("nan") if len(self.batch_sizes) >= self.calls else value


def oriented_images(n: int = 64, seed: int = 0) -> np.ndarray:
    """``(n, 32, 32, 3) uint8`` noisy images, dark at the top and bright at the bottom."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, SIZE)[None, :, None, None]
    return ((0.6 * ramp + 0.4 * rng.random((n, SIZE, SIZE, 3))) * 255).astype(np.uint8)


def build(seed: int = 0, objective=RotationObjective):
    torch.manual_seed(seed)
    encoder = make_backbone("small-cnn", image_size=SIZE)
    return encoder, objective(encoder.embedding_dim)


def fast(**changes) -> TrainConfig:
    settings = dict(epochs=3, batch_size=16, learning_rate=0.05, device="cpu")
    return TrainConfig(**{**settings, **changes})


def weights(*modules):
    return [value.clone() for module in modules for value in module.state_dict().values()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def images():
    return oriented_images()


def test_training_lowers_the_loss_of_the_objective(images):
    encoder, objective = build()
    result = train(encoder, objective, images, fast(epochs=4))
    assert len(result.losses) == 4 and result.epochs_run == 4 and result.resumed_from is None
    assert result.device == "cpu" and np.isfinite(result.seconds)  # a duration: its size is not asserted
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert not encoder.training and not objective.training


def test_same_seed_gives_the_same_weights(images):
    runs = []
    for seed in (0, 0, 1):
        encoder, objective = build()
        train(encoder, objective, images, fast(epochs=2, seed=seed))
        runs.append(weights(encoder, objective))
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])


def test_resume_equals_an_uninterrupted_run(images, tmp_path):
    config = fast(epochs=4)
    encoder, objective = build()
    straight = train(encoder, objective, images, config)
    expected = weights(encoder, objective)

    token, steps_per_epoch = CancelToken(), len(images) // config.batch_size

    def stop_after_two_epochs(event):
        if event.done == 2 * steps_per_epoch:
            token.cancel()

    encoder, objective = build()
    with pytest.raises(Cancelled):
        train(encoder, objective, images, config, checkpoint_dir=tmp_path, monitor=Monitor(stop_after_two_epochs, token))
    saved = json.loads((tmp_path / CHECKPOINT_FILE).read_text())
    assert saved["epoch"] == 2 and saved["folder"] == "epoch-0002"
    assert [p.name for p in tmp_path.glob("epoch-*")] == ["epoch-0002"]

    encoder, objective = build(seed=7)  # other initial weights: the checkpoint must replace them
    events = []
    resumed = train(encoder, objective, images, config, checkpoint_dir=tmp_path, monitor=Monitor(events.append))
    assert resumed.resumed_from == 2 and resumed.epochs_run == 2
    assert events[0].done == 2 * steps_per_epoch + 1
    assert resumed.losses == straight.losses
    assert same(weights(encoder, objective), expected)

    again = train(encoder, objective, images, config, checkpoint_dir=tmp_path)  # finished: nothing to do
    assert again.resumed_from == 4 and again.epochs_run == 0 and again.losses == straight.losses
    assert same(weights(encoder, objective), expected)

    (tmp_path / "epoch-0004" / "optimizer.pt").write_bytes(b"damaged")
    with pytest.raises(RunError, match="incomplete or damaged.*delete that folder"):
        train(encoder, objective, images, config, checkpoint_dir=tmp_path)


def test_a_checkpoint_of_another_config_or_data_is_not_resumed(tmp_path):
    rows = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)

    def run(data, **changes):
        torch.manual_seed(0)
        encoder = make_backbone("mlp", n_features=6)
        objective = DenoiseObjective(encoder.embedding_dim, 6)
        return train(encoder, objective, data, fast(batch_size=8, **changes), checkpoint_dir=tmp_path)

    assert run(rows).resumed_from is None
    assert run(rows).resumed_from == 3
    assert run(rows, learning_rate=0.01).resumed_from is None
    assert run(rows, learning_rate=0.01, checkpoint_every=2).resumed_from == 3  # does not change the result
    assert run(rows[::-1].copy(), learning_rate=0.01).resumed_from is None


def test_tables_train_with_the_mlp():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(128, 2))
    rows = (latent @ rng.normal(size=(2, 8)) + 0.05 * rng.normal(size=(128, 8))).astype(np.float32)
    torch.manual_seed(0)
    encoder = make_backbone("mlp", n_features=8)
    result = train(encoder, DenoiseObjective(encoder.embedding_dim, 8), rows, fast(batch_size=32, epochs=5))
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_a_non_finite_loss_stops_training_with_a_clear_error(images, tmp_path):
    encoder, objective = build(objective=NaNAfter)
    before = weights(encoder)
    with pytest.raises(TrainingError, match=r"became nan at epoch 1/3, step 3/4.*Lower learning_rate \(now 0.05"):
        train(encoder, objective, images, fast(), checkpoint_dir=tmp_path)
    after = weights(encoder)
    assert not same(before, after)  # two good steps were taken ...
    assert all(torch.isfinite(value.float()).all() for value in after)  # ... and the NaN one was not
    assert not (tmp_path / CHECKPOINT_FILE).exists()

    encoder, objective = build(objective=NaNAfter)
    objective.calls = 6
    with pytest.raises(TrainingError, match=r"epoch 2/3, step 2/4.* keeps the checkpoint of epoch 1"):
        train(encoder, objective, images, fast(), checkpoint_dir=tmp_path)


def test_cancel_stops_before_the_next_step(images):
    token = CancelToken()
    token.cancel()
    encoder, objective = build()
    events = []
    with pytest.raises(Cancelled):
        train(encoder, objective, images, fast(), monitor=Monitor(events.append, token))
    assert events == [] and objective.batch_sizes == []


def test_progress_reports_every_step_and_batches_drop_the_remainder():
    encoder, objective = build()
    events = []
    train(encoder, objective, oriented_images(70), fast(epochs=2), monitor=Monitor(events.append))
    assert [e.done for e in events] == list(range(1, 9))  # 70 // 16 = 4 steps per epoch
    assert all(e.stage == "train" and e.total == 8 for e in events)
    assert events[0].message.startswith("epoch 1/2 loss ") and events[-1].message.startswith("epoch 2/2 loss ")
    assert objective.batch_sizes == [16] * 8
    assert len(set(objective.seeds[:4])) == 1 and objective.seeds[0] != objective.seeds[4]  # new draws each epoch

    encoder, objective = build()
    train(encoder, objective, oriented_images(10), fast(epochs=2))
    assert objective.batch_sizes == [10, 10]  # fewer samples than a batch: one step of all of them


def test_training_leaves_the_global_random_state_alone(images):
    encoder, objective = build()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    train(encoder, objective, images[:32], fast(epochs=1))
    assert torch.equal(torch.get_rng_state(), state)


def test_cosine_schedule_warms_up_then_decays():
    rates = cosine_schedule(0.1, total_steps=20, warmup_steps=5)
    assert rates.shape == (20,)
    np.testing.assert_allclose(rates[:5], [0.02, 0.04, 0.06, 0.08, 0.1])
    assert rates[5] == pytest.approx(0.1) and np.all(np.diff(rates[5:]) < 0) and rates[-1] > 0
    assert cosine_schedule(0.1, 10)[0] == pytest.approx(0.1)


@pytest.mark.parametrize("changes, match", [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 1}, "batch_size"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"warmup_epochs": 3}, r"warmup_epochs must be in \[0, epochs\)"),
    ({"seed": -1}, "seed"),
    ({"device": "tpu"}, "auto, cpu, cuda"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
])
def test_config_validation_names_the_bad_value(changes, match):
    with pytest.raises(ConfigError, match=match):
        fast(**changes).validate()


@pytest.mark.parametrize("data", [
    np.zeros((4, SIZE, SIZE), np.uint8),            # no channel axis
    np.zeros((4, SIZE, SIZE, 3), np.float32),       # images must be uint8
    np.zeros((1, 5), np.float32),                   # one sample
    np.array([[0.0, np.nan], [1.0, 2.0]], np.float32),
])
def test_unusable_data_is_a_data_error(data):
    encoder, objective = build()
    with pytest.raises(DataError):
        train(encoder, objective, data, fast())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_with_amp_lowers_the_loss(images):
    encoder, objective = build()
    result = train(encoder, objective, images, fast(epochs=4, device="cuda", amp=True))
    assert result.device == "cuda" and all(np.isfinite(result.losses))
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert next(encoder.parameters()).device.type == "cuda"
    assert next(encoder.parameters()).dtype == torch.float32  # autocast keeps float32 master weights
