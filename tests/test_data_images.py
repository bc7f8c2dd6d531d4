"""Image folders: scan, validation, layouts (plain, good/normal/ok, MVTec, sibling masks), read_rgb."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import decode as decode_module
from core.data.decode import MAX_IMAGE_PIXELS, read_rgb
from core.data.images import IMAGE_SUFFIXES, load_image_folder
from core.errors import Cancelled, DataError
from core.progress import CancelToken, Monitor


def write_image(path: Path, size=(16, 12), mode="RGB", value=None, seed=0, fmt=None) -> Path:
    """A small noisy image (or a constant one when ``value`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], 3)
    pixels = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, np.uint8)
    Image.fromarray(pixels, mode).save(path, format=fmt)
    return path


def write_mask(path: Path, size=(16, 12)) -> Path:
    pixels = np.zeros((size[1], size[0]), np.uint8)
    pixels[2:6, 3:9] = 255
    pixels[6, 3:9] = 128  # a soft edge
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path)
    return path


def test_plain_folder_is_scanned_recursively_in_sorted_order(tmp_path):
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "A.JPG")
    write_image(tmp_path / "sub" / "deep" / "c.webp")
    write_image(tmp_path / "sub" / "d.TIFF")
    write_image(tmp_path / ".hidden.png")
    write_image(tmp_path / ".cache" / "e.png")
    write_image(tmp_path / "__MACOSX" / "f.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.kind == "images"
    assert data.ids == ["A.JPG", "b.png", "sub/d.TIFF", "sub/deep/c.webp"]
    assert data.paths == [tmp_path / i for i in data.ids]
    assert data.labels is None and data.masks == {} and data.skipped == []
    assert data.source == tmp_path
    assert load_image_folder(tmp_path).fingerprint == data.fingerprint


def test_unreadable_images_are_skipped_with_a_reason_and_one_warning(tmp_path, caplog):
    write_image(tmp_path / "good1.png")
    write_image(tmp_path / "good2.jpg", size=(64, 64))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a PNG")
    full = write_image(tmp_path / "cut.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    full = write_image(tmp_path / "cut.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with caplog.at_level(logging.WARNING, logger="core.data.images"):
        data = load_image_folder(tmp_path)
    assert data.ids == ["good1.png", "good2.jpg"]
    assert sorted(s.name for s in data.skipped) == ["cut.jpg", "cut.png", "empty.png", "text.png"]
    assert all(s.reason for s in data.skipped)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 4" in warnings[0].getMessage()


def test_folder_without_any_readable_image_is_a_data_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    with pytest.raises(DataError, match=r"no readable image in .* \(2 files skipped: a.png: "):
        load_image_folder(tmp_path)


def test_empty_folder_and_folder_without_images_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        load_image_folder(tmp_path)
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(tmp_path / "readme.md")


@pytest.mark.parametrize("normal_name", ["good", "Normal", "OK"])
def test_normal_named_folder_gives_labels(tmp_path, normal_name):
    write_image(tmp_path / normal_name / "1.png")
    write_image(tmp_path / normal_name / "nested" / "2.png")
    write_image(tmp_path / "scratch" / "3.png")
    write_image(tmp_path / "dent" / "4.png")
    write_image(tmp_path / "loose.png")
    data = load_image_folder(tmp_path)
    expected = {f"{normal_name}/1.png": 0, f"{normal_name}/nested/2.png": 0, "scratch/3.png": 1,
                "dent/4.png": 1, "loose.png": -1}
    assert dict(zip(data.ids, data.labels.tolist())) == expected
    assert data.labels.dtype == np.int8 and data.has_labels


def test_single_wrapper_folder_is_looked_through_for_labels(tmp_path):
    write_image(tmp_path / "parts" / "good" / "1.png")
    write_image(tmp_path / "parts" / "bad" / "2.png")
    data = load_image_folder(tmp_path)
    assert data.ids == ["parts/bad/2.png", "parts/good/1.png"]
    assert data.labels.tolist() == [1, 0]


def test_no_normal_folder_means_no_labels(tmp_path):
    write_image(tmp_path / "cats" / "1.png")
    write_image(tmp_path / "dogs" / "2.png")
    assert load_image_folder(tmp_path).labels is None


def test_folder_of_masks_only_is_a_data_error(tmp_path):
    write_mask(tmp_path / "a_mask.png")
    with pytest.raises(DataError, match="every image is a mask"):
        load_image_folder(tmp_path)


def test_mask_suffix_files_are_masks_not_samples(tmp_path):
    write_image(tmp_path / "good" / "a.png")
    write_image(tmp_path / "bad" / "b.png")
    write_mask(tmp_path / "bad" / "b_mask.png")
    write_mask(tmp_path / "bad" / "orphan_mask.png")
    data = load_image_folder(tmp_path)
    assert data.ids == ["bad/b.png", "good/a.png"]
    assert data.masks == {"bad/b.png": tmp_path / "bad" / "b_mask.png"}


def build_mvtec(root: Path) -> Path:
    for i in range(3):
        write_image(root / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png", seed=10 + i)
    for defect in ("crack", "scratch"):
        for i in range(2):
            write_image(root / "test" / defect / f"{i:03d}.png", seed=20 + i)
            write_mask(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    write_image(root / "validation" / "x.png")  # not part of the layout
    (root / "license.txt").write_text("CC BY-NC-SA")
    return root


def test_mvtec_layout_labels_and_ground_truth_masks(tmp_path):
    build_mvtec(tmp_path / "bottle")
    data = load_image_folder(tmp_path)  # the category folder is the single sub-folder
    assert len(data) == 3 + 2 + 4
    assert all(i.startswith("bottle/t") for i in data.ids)  # no ground_truth / validation samples
    labels = dict(zip(data.ids, data.labels.tolist()))
    assert labels["bottle/train/good/000.png"] == 0
    assert labels["bottle/test/good/001.png"] == 0
    assert labels["bottle/test/crack/000.png"] == 1
    assert sum(data.labels) == 4
    assert data.masks["bottle/test/scratch/001.png"] == tmp_path / "bottle/ground_truth/scratch/001_mask.png"
    assert set(data.masks) == {i for i in data.ids if "/crack/" in i or "/scratch/" in i}
    direct = load_image_folder(tmp_path / "bottle")
    assert direct.ids == [i.removeprefix("bottle/") for i in data.ids]
    assert direct.labels.tolist() == data.labels.tolist()


def build_magnetic_tiles(root: Path) -> Path:
    """MT_<class>/Imgs/<name>.jpg with its mask <name>.png, as in Magnetic Tile Defects."""
    for cls in ("MT_Free", "MT_Crack"):
        for i in range(2):
            write_image(root / cls / "Imgs" / f"exp{i}.jpg", mode="L", seed=i)
            write_mask(root / cls / "Imgs" / f"exp{i}.png")
    return root


def test_sibling_png_masks_of_jpegs_are_attached(tmp_path):
    build_magnetic_tiles(tmp_path)
    data = load_image_folder(tmp_path)
    assert data.ids == ["MT_Crack/Imgs/exp0.jpg", "MT_Crack/Imgs/exp1.jpg",
                        "MT_Free/Imgs/exp0.jpg", "MT_Free/Imgs/exp1.jpg"]
    assert data.masks == {i: tmp_path / i.replace(".jpg", ".png") for i in data.ids}
    assert data.labels is None


def test_sibling_png_that_is_not_a_mask_stays_a_sample(tmp_path):
    write_image(tmp_path / "photo.jpg")
    write_image(tmp_path / "photo.png")  # an RGB export of the same photo
    write_image(tmp_path / "gray.jpg", mode="L")
    gradient = np.tile(np.arange(16, dtype=np.uint8) * 16, (12, 1))
    Image.fromarray(gradient, "L").save(tmp_path / "gray.png")  # single-channel but not binary
    write_image(tmp_path / "small.jpg", size=(32, 32))
    write_mask(tmp_path / "small.png")  # binary, but not the jpeg's size
    data = load_image_folder(tmp_path)
    assert len(data) == 6 and data.masks == {}


def test_progress_and_cancel(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png")
    events = []
    load_image_folder(tmp_path, monitor=Monitor(events.append))
    assert events[-1].stage == "load" and events[-1].done == events[-1].total == 3
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        load_image_folder(tmp_path, monitor=Monitor(cancel=token))


def test_pixel_limit_is_set_in_pil_and_oversized_images_are_skipped(tmp_path, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
    write_image(tmp_path / "small.png", size=(8, 8))
    write_image(tmp_path / "large.png", size=(40, 40))
    monkeypatch.setattr(decode_module, "MAX_IMAGE_PIXELS", 1000)
    data = load_image_folder(tmp_path)
    assert data.ids == ["small.png"]
    assert "too large" in data.skipped[0].reason
    with pytest.raises(DataError, match="too large to decode safely"):
        read_rgb(tmp_path / "large.png", 8)


def test_pil_decompression_bomb_error_becomes_data_error(tmp_path, monkeypatch):
    path = write_image(tmp_path / "large.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises at twice this
    with pytest.raises(DataError, match="too large to decode safely"):
        read_rgb(path, 8)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_read_rgb_converts_every_mode(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = Image.fromarray(np.full((10, 14), 65535, np.uint16))
    cases = {
        "rgb.jpg": Image.fromarray(rng.integers(0, 256, (40, 60, 3), np.uint8)),
        "cmyk.jpg": Image.new("CMYK", (20, 10), (0, 255, 0, 0)),
        "gray.png": Image.new("L", (9, 7), 200),
        "bits.bmp": Image.new("1", (9, 7), 1),
        "palette.png": Image.new("RGB", (9, 7), (0, 0, 255)).convert("P"),
        "alpha.png": Image.new("RGBA", (9, 7), (255, 0, 0, 0)),
        "gray_alpha.png": Image.new("LA", (9, 7), (255, 255)),
        "gray16.png": gray16,
        "float.tif": Image.fromarray(np.full((6, 6), 0.5, np.float32)),
    }
    arrays = {}
    for name, image in cases.items():
        arrays[name] = read_rgb(_save(tmp_path / name, image), 24)
        assert arrays[name].shape == (24, 24, 3) and arrays[name].dtype == np.uint8, name
    assert gray16.mode == "I;16"
    assert (arrays["gray16.png"] == 255).all()  # full 16-bit range maps to full 8-bit range
    assert (arrays["alpha.png"] == 0).all()  # transparent pixels are composited over black
    assert (arrays["gray.png"] == 200).all() and (arrays["bits.bmp"] == 255).all()
    assert (arrays["palette.png"][..., 2] == 255).all()
    assert np.abs(arrays["float.tif"].astype(int) - 128).max() <= 1
    magenta = arrays["cmyk.jpg"].reshape(-1, 3).mean(axis=0)  # CMYK (0, 255, 0, 0) is magenta
    assert magenta[0] > 200 and magenta[1] < 60 and magenta[2] > 200
    array = read_rgb(tmp_path / "rgb.jpg", 24)
    assert np.array_equal(array, arrays["rgb.jpg"])  # deterministic


def test_read_rgb_errors_are_data_errors(tmp_path):
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(DataError, match="cannot read image"):
        read_rgb(tmp_path / "bad.png", 8)
    with pytest.raises(DataError, match="cannot read image"):
        read_rgb(tmp_path / "missing.png", 8)


def test_suffixes_are_lower_case():
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)
