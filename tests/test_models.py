"""Encoders: pretrained image features and the table encoder."""

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import FitConfig
from core.data import table_dataset
from core.data.images import load_image_folder
from core.errors import Cancelled, DataError
from core.models.pretrained import load_backbone
from core.models.image_encoder import ImageEncoder
from core.models.tabular import TableEncoder
from core.progress import CancelToken, Monitor
from sample_data import write_digits_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return load_image_folder(write_digits_images(tmp_path_factory.mktemp("img"), n_normal=10, n_anomalous=2))


def test_feature_widths_follow_the_layers(images):
    for layers, width in ((("stride16",), 112), (("stride16", "stride32"), 432), (("head",), 1280)):
        encoder = ImageEncoder(FitConfig(image_size=64, feature_layers=layers, device="cpu"))
        assert encoder.embed(images).shape == (len(images), width)


def test_embeddings_are_deterministic_and_batch_independent(images):
    a = ImageEncoder(FitConfig(image_size=64, batch_size=5, device="cpu")).embed(images)
    b = ImageEncoder(FitConfig(image_size=64, batch_size=12, device="cpu")).embed(images)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert a.dtype == np.float32 and np.isfinite(a).all()


def test_channels_last_matches_default_layout():
    model = load_backbone("efficientnet-lite0", 64, "cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fast = model.pooled(x.contiguous(memory_format=torch.channels_last), ("stride16",))
        plain = model.pooled(x.contiguous(), ("stride16",))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_progress_and_cancel(images):
    events = []
    ImageEncoder(FitConfig(image_size=64, batch_size=4, device="cpu")).embed(images, monitor=Monitor(events.append))
    assert [e.done for e in events] == [4, 8, 12] and all(e.total == 12 for e in events)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        ImageEncoder(FitConfig(image_size=64, device="cpu")).embed(images, monitor=Monitor(cancel=token))


def frame_dataset(frame):
    return table_dataset(frame, "t.csv")


def test_table_encoder_scales_one_hots_imputes_and_round_trips(tmp_path):
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0, np.nan], "colour": ["red", "blue", "red", "blue", "red"],
                          "flag": [True, False, True, True, False], "const": [5.0] * 5})
    encoder = TableEncoder().fit(frame_dataset(train))
    assert encoder.feature_names == ["x", "flag", "const", "colour=blue", "colour=red"]
    encoded = encoder.embed(frame_dataset(train))
    assert np.isfinite(encoded).all()
    assert encoded[4, 0] == 0.0, "NaN imputed with the training median, which scales to 0"
    new = pd.DataFrame({"x": [2.5], "colour": ["green"], "flag": [True], "const": [9.0]})
    row = encoder.embed(frame_dataset(new))[0]
    assert list(row[3:]) == [0.0, 0.0], "an unseen category encodes as all zeros"
    assert row[2] == 4.0, "a constant column keeps scale 1, so a change stays visible"
    encoder.save(tmp_path)
    np.testing.assert_array_equal(TableEncoder.load(tmp_path).embed(frame_dataset(new)), encoder.embed(frame_dataset(new)))


def test_table_encoder_errors():
    with pytest.raises(DataError, match="no finite value"):
        TableEncoder().fit(frame_dataset(pd.DataFrame({"x": [np.nan, np.inf]})))
    encoder = TableEncoder().fit(frame_dataset(pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 4.0]})))
    with pytest.raises(DataError, match="lacks columns"):
        encoder.embed(frame_dataset(pd.DataFrame({"x": [1.0]})))
    with pytest.raises(DataError, match="now holds text"):
        encoder.embed(frame_dataset(pd.DataFrame({"x": ["a"], "y": [1.0]})))
