"""The run report: one self-contained HTML file (images as data: URIs, no script, nothing from elsewhere)."""
import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from core import engine
from core.config import FitConfig
from core.data.builtin import DEMO_DIR
from core.errors import ConfigError
from core.registry import Registry
from core.report import report_html, write_report
from core.results import RunResults, score_text
from sample_data import fraud_table

MAX_DEMO_BYTES = 5_000_000  # issue 17: the demo run's report under 5 MB
HOSTILE_ID = '<script>alert("id")</script>'
HOSTILE_COLUMN = "<img src=x onerror=alert(1)>"
HOSTILE_NOTE = "</td><script>alert('note')</script>"
SECTIONS = ("data", "settings", "rounds", "scores", "top", "verdicts", "metrics")


class Page(HTMLParser):
    """The tags of a page with their attributes, and the ids of its sections."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def all(self, name: str) -> list[dict]:
        return [attrs for tag, attrs in self.tags if tag == name]


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """A private Refinery home (its registry holds the verdicts a report reads by default)."""
    home = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFINERY_HOME", str(home / "refinery-home"))
        yield home


@pytest.fixture(scope="module")
def image_run(home):
    """The demo (300 Fashion-MNIST images, 10% planted, labelled by folder) at the suggested settings."""
    demo = engine.load_data(DEMO_DIR, workspace=home)
    return engine.fit(demo, engine.suggested_config(demo), home / "images").run_dir


@pytest.fixture(scope="module")
def image_report(image_run):
    run = RunResults(image_run)
    ranked = run.samples.sort_values("rank")["id"].tolist()
    verdicts = {ranked[0]: ("anomaly", "torn"), ranked[-1]: ("anomaly", "missed by the model"),
                ranked[1]: ("unsure", "")}
    return report_html(image_run, top=6, verdicts=verdicts), run, verdicts


@pytest.fixture(scope="module")
def hostile_run(home):
    """A payments table whose most anomalous row has a script for an id and a column an img tag for a name."""
    table = fraud_table().drop(columns="is_fraud").rename(columns={"duration": HOSTILE_COLUMN})
    table.loc[int(np.argmax(table["amount"])), "record"] = HOSTILE_ID
    table.to_csv(home / "payments.csv", index=False)
    dataset = engine.load_data(home / "payments.csv", id_column="record", label_required=False)
    return engine.fit(dataset, FitConfig(id_column="record"), home / "table").run_dir


def external_references(text: str) -> list[str]:
    """Every src/href/xlink:href value that is neither an embedded data: URI nor a link inside the page."""
    page = Page(text)
    values = [value for _, attrs in page.tags for key, value in attrs.items()
              if key in ("src", "href", "xlink:href", "srcset", "action", "poster") and value is not None]
    return [v for v in values if not (v.startswith("data:") or (v.startswith("#") and "//" not in v))]


def decoded_images(text: str) -> list[Image.Image]:
    """Each <img> decoded from its data: URI (fails the test on any other source), checked against its size."""
    images = []
    for attrs in Page(text).all("img"):
        found = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", attrs["src"])
        assert found, attrs["src"][:80]
        image = Image.open(io.BytesIO(base64.b64decode(found.group(2), validate=True)))
        image.load()
        assert (image.width, image.height) == (int(attrs["width"]), int(attrs["height"]))
        images.append(image)
    return images


def test_image_report_is_self_contained_and_small(image_report, image_run, tmp_path):
    text, run, _ = image_report
    assert external_references(text) == []
    assert not re.search(r"https?:|<script|<link|<iframe|<object|@import|url\(", text, re.IGNORECASE)
    assert 'http-equiv="Content-Security-Policy"' in text and "default-src 'none'" in text
    images = decoded_images(text)
    assert len(images) == 2 * 6 + 1, "each shown sample's image and its map, and the colour bar"
    assert all(max(image.size) <= 256 for image in images[1:]), "thumbnails are small"
    path = write_report(image_run, tmp_path / "demo.html")  # the default top, as the CLI and the studio write it
    size = path.stat().st_size
    print(f"\ndemo run report: {size / 1e6:.3f} MB, {len(decoded_images(path.read_text()))} images")
    assert size < MAX_DEMO_BYTES


def test_image_report_sections_follow_the_run(image_report):
    text, run, _ = image_report
    page = Page(text)
    assert [attrs["id"] for attrs in page.all("section")] == list(SECTIONS)
    assert [attrs["href"] for attrs in page.all("a")] == [f"#{name}" for name in SECTIONS]
    shown = re.findall(r'<figure class="card"><div class="pictures">.*?<code>(.*?)</code>', text)
    assert shown == run.samples.sort_values("rank")["id"].head(6).tolist(), "the most anomalous, in rank order"
    for record in run.rounds:  # every round's outcome and note
        assert f"<td>{record.round}</td><td>{len(record.removed)}</td><td>{len(record.returned)}</td>" in text
        assert record.note in text
    assert "<svg" in text and f"threshold {score_text(run.threshold)}" in text and run.threshold_meaning in text
    kept = int(run.samples["kept"].sum())
    assert f"<td><strong>kept after refinement</strong></td><td>{kept}</td>" in text
    assert f"<td>{run.config.image_size}</td>" in text, "settings table"


def test_image_report_has_verdicts_and_metrics(image_report):
    text, run, verdicts = image_report
    assert "3 samples judged: 0 normal, 2 anomaly, 1 unsure" in text
    assert "disagree on 1." in text, "the lowest-ranked sample called anomaly by the expert, normal by the model"
    assert "missed by the model" in text
    metrics = run.metrics
    assert f"<td>{metrics.auroc:.3f}</td>" in text and f"<td>{metrics.ap:.3f}</td>" in text
    assert "Confusion at the threshold" in text and 'aria-label="ROC"' in text


def test_table_report_escapes_what_came_from_the_data(hostile_run, home):
    run = RunResults(hostile_run)
    assert run.samples.sort_values("rank")["id"].iat[0] == HOSTILE_ID
    Registry().set_verdict(run.fingerprint, HOSTILE_ID, "anomaly", HOSTILE_NOTE)  # read by default
    text = report_html(hostile_run, top=5)
    assert "<script" not in text.lower() and "<img" not in text.lower() and "onerror=alert(1)>" not in text
    assert "&lt;script&gt;alert(&quot;id&quot;)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text, "a hostile column name among the top features"
    assert "&lt;/td&gt;&lt;script&gt;alert(&#x27;note&#x27;)&lt;/script&gt;" in text, "the verdict's note"
    assert external_references(text) == []
    assert "No labels of both kinds" in text and 'class="features"' in text


def test_report_options(hostile_run, image_run):
    with pytest.raises(ConfigError, match="top"):
        report_html(hostile_run, top=-1)
    text = report_html(image_run, top=0, verdicts={})
    assert Page(text).all("img") == [] and "No verdicts recorded" in text


def test_thumbnails_keep_the_shape_and_the_map_over_the_image():
    from core.explain.render import ColourScale
    from core.report.markup import THUMB_PX, thumbnail_pair

    rng = np.random.default_rng(0)
    photo, hot = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8), np.zeros((400, 600), np.float32)
    hot[:, 300:] = 1.0  # the right half above the floor
    small, heat = thumbnail_pair(photo, hot, ColourScale(0.5, 1.0))
    assert small.shape == heat.shape == (THUMB_PX * 2 // 3, THUMB_PX, 3), "reduced, aspect kept"
    assert np.array_equal(heat[:, :THUMB_PX // 2 - 2], small[:, :THUMB_PX // 2 - 2]), "below the floor: the image"
    assert not np.array_equal(heat[:, THUMB_PX // 2 + 2:], small[:, THUMB_PX // 2 + 2:])
    tiny = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    enlarged, none = thumbnail_pair(np.repeat(tiny[..., None], 3, axis=2), None, None)
    assert none is None and enlarged.shape == (168, 168, 3) and np.array_equal(enlarged[::6, ::6, 0], tiny)
