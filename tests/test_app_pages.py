"""Every page of the studio through Streamlit's ``AppTest``, against real runs fitted by the engine.

Each test gets its own Refinery home (``$REFINERY_HOME``). The session's ``studio_runs`` (one
demo image run, one digits table run, both the command line's, so visible to every studio
session) are fitted once: a test that only reads them uses them in place (``shared``); a test that
writes into a run or the registry (a verdict, the map's layout cache) gets a copy in its own home
(``own_runs``), so no test sees another's writes, whatever their order. Streamlit's process-wide
caches are cleared around every test so that no job runner, registry or data set leaks from one
home to another. Each ``studio()`` without a ``session`` in its URL is a new browser, with a
studio session of its own. Plotly selection events (lasso/box on the map) cannot be sent through
``AppTest``: the Embeddings tests set the selection the event would produce in session state
instead. Jobs that a test acts on while they run are held running until it lets them go
(``held_jobs``), so the test does not race the fit.
"""
from __future__ import annotations

import base64
import secrets
import json
import shutil
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app_fixtures import (
    ROOT,
    clear_streamlit_caches,
    fit_demo_run,
    fit_digits_run,
    run_id,
    script,
    session_id,
    standalone,
    studio,
    wait_for_job,
)
from core import engine
from core.data.builtin import DEMO_DIR, builtin_sources, prepare_builtin
from core.data.columns import ColumnChoice
from core.data.protocol import contaminate
from core.data.uploads import MAX_UPLOAD_BYTES, save_uploads
from core.progress import ProgressEvent
from core.registry import Registry
from core.results import RunResults, score_axis
from pages.components.navigation import DATA, EMBEDDINGS, INSPECT, REFINE, RESULTS
from pages.components.charts import KEPT_COLOUR, REMOVED_COLOUR, score_text
from pages.components.services import FOREIGN_JOB, FOREIGN_RUN
from pages.components.state import session_id_of
from sample_data import fraud_table


@dataclass(frozen=True)
class StudioRuns:
    home: Path
    images: Path   # the demo: 300 images, 30 labelled anomalies, localization maps
    table: Path    # the digits table: 200 rows, 20 labelled anomalies


@pytest.fixture(scope="session")
def studio_runs(tmp_path_factory) -> StudioRuns:
    home = tmp_path_factory.mktemp("studio-home").resolve()
    return StudioRuns(home, fit_demo_run(home), fit_digits_run(home))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty Refinery home for the test, and Streamlit caches that know nothing yet."""
    home = (tmp_path / "refinery-home").resolve()
    monkeypatch.setenv("REFINERY_HOME", str(home))
    clear_streamlit_caches()
    yield home
    clear_streamlit_caches()


@pytest.fixture
def shared(studio_runs, home, monkeypatch) -> StudioRuns:
    """Use the session's home with its two runs instead of the empty one, for a test that only reads them."""
    monkeypatch.setenv("REFINERY_HOME", str(studio_runs.home))
    return studio_runs


@pytest.fixture
def own_runs(studio_runs, home) -> StudioRuns:
    """A copy of the session's home (its two runs and registry) as the test's own home, for a test that
    writes into a run or the registry.

    The copied registry still names the original folders; it finds each copy by the run id in the
    copy's ``run.json`` (:meth:`core.registry.Registry.run_at`), so the test opens the copies by path.
    """
    shutil.copytree(studio_runs.home, home)
    return StudioRuns(home, home / studio_runs.images.relative_to(studio_runs.home),
                      home / studio_runs.table.relative_to(studio_runs.home))


@pytest.fixture
def runner(home):
    """The job runner the pages share (a ``st.cache_resource``, the same object in every session)."""
    from pages.components import services

    return services.job_runner()


HOLD_S = 120.0
"""A held job goes on by itself after this long, should a test fail before letting it go."""


@dataclass
class Hold:
    """``running`` is set once a held job runs; the job's fit starts when ``release`` is set."""
    running: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def wait_running(self) -> None:
        assert self.running.wait(HOLD_S), f"no job started running within {HOLD_S} s"


@pytest.fixture
def held_jobs(runner, monkeypatch) -> Hold:
    """Jobs the pages submit from now on run, but start their work only once ``release`` is set.

    While held, a job is running (active, cancellable) whatever the machine's speed; a cancel made
    meanwhile stops its fit at the first check, after the fit has registered its run.
    """
    hold = Hold()
    submit = runner.submit

    def submit_held(title, work, **options):
        def held(context):
            hold.running.set()
            hold.release.wait(HOLD_S)
            return work(context)

        return submit(title, held, **options)

    monkeypatch.setattr(runner, "submit", submit_held)
    yield hold
    hold.release.set()


def metrics(at) -> dict[str, str]:
    return {metric.label: metric.value for metric in at.metric}


def charts(at) -> list:
    return list(at.get("plotly_chart"))


def captions(at) -> list[str]:
    """Captions of every image on the page."""
    return [caption for image in at.image for caption in image.captions]


def frames(at) -> list[pd.DataFrame]:
    """Every ``st.dataframe`` on the page."""
    return [element.value for element in at.dataframe]


def assert_clean(at) -> None:
    assert not at.exception, at.exception
    assert not at.error, [error.value for error in at.error]


# ----------------------------------------------------------------------------------------- Data


def test_data_page_first_shows_the_builtin_demo(home):
    at = studio()
    assert_clean(at)
    assert at.title[0].value == "Data"
    shown = metrics(at)
    assert (shown["Kind"], shown["Samples"], shown["Labelled anomalous"]) == ("images", "300", "30")
    assert len(at.image) == 24 and all(captions(at))  # the preview gallery, each image named
    assert at.session_state["data_path"] == str(DEMO_DIR)
    assert "fashion-mnist-sneakers" in at.sidebar.caption.values


def test_data_page_switches_to_a_builtin_table(home):
    at = studio()
    digits = next(source for source in builtin_sources() if source.key == "digits")
    at.radio(key="builtin_choice").set_value(digits).run()
    at.button(key="use_builtin").click().run()
    assert_clean(at)
    shown = metrics(at)
    assert (shown["Kind"], shown["Samples"], shown["Labelled anomalous"]) == ("table", "200", "20")
    assert at.dataframe[0].value.shape == (50, 64)  # the first 50 rows, 64 pixel columns
    roles = shown_roles(at)  # the Columns panel
    assert roles.pop("label") == "label" and list(roles.values()) == ["feature"] * 64
    assert len(at.image) == 0
    assert at.session_state["column_choice"] == ColumnChoice(label_column="label")
    assert Path(at.session_state["data_path"]).is_relative_to(home / "workspace")


def test_data_page_says_clearly_that_a_server_path_does_not_exist(home):
    at = studio()
    at.text_input(key="server_path").set_value(str(home / "no-such-folder")).run()
    at.button(key="use_server").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "does not exist on the server" in at.error[0].value
    assert "Something went wrong" not in at.error[0].value  # a message written for the user, not a crash summary
    assert at.session_state["data_path"] == str(DEMO_DIR)  # the active data did not change


def test_contamination_protocol_sets_the_training_set_of_the_refine_page(home):
    at = studio(REFINE)
    assert at.caption[0].value.startswith("Training data: 300 images")
    at.switch_page(script(DATA)).run()
    at.slider(key="protocol_ratio").set_value(0.05).run()
    at.button(key="apply_protocol").click().run()
    assert_clean(at)
    assert at.session_state["protocol"] == (0.05, 0)
    assert at.success and "anomal" in at.success[0].value
    expected = contaminate(engine.load_data(DEMO_DIR), 0.05, 0).train
    at.switch_page(script(REFINE)).run()
    assert_clean(at)
    caption = at.caption[0].value
    assert caption.startswith(f"Training data: {len(expected)} images") and "contamination protocol applied" in caption
    assert len(expected) < 300


# --------------------------------------------------------------------------------------- Refine


def test_refine_runs_a_job_to_a_saved_run_and_a_second_tab_follows_it(home, runner, held_jobs):
    at = studio(REFINE)
    assert_clean(at)
    at.number_input(key="rounds").set_value(2)
    at.selectbox(key="localization").set_value("none")
    at.form_submit_button[0].click().run()
    assert_clean(at)
    job_id = at.query_params["job"]
    held_jobs.wait_running()

    # Another tab opened on the session's URL (here without its job) while the job runs.
    second = studio(REFINE, url={"session": at.query_params["session"]})
    assert_clean(second)
    assert len(runner.jobs()) == 1
    assert runner.status(job_id).state == "running"
    assert second.query_params["job"] == job_id  # it follows the session's running job
    assert second.form_submit_button[0].disabled  # no second job from this tab meanwhile
    stranger = studio(REFINE)  # another browser: its own session, which neither follows nor waits for the job
    assert_clean(stranger)
    assert "job" not in stranger.query_params and not stranger.form_submit_button[0].disabled

    held_jobs.release.set()
    wait_for_job(at, runner)
    assert_clean(at)
    assert at.success and at.success[0].value.startswith("Finished")
    run_dir = Path(at.query_params["run"])
    assert run_dir.parent == home / "runs" and (run_dir / "run.json").is_file()
    saved = RunResults(run_dir)
    assert 1 <= len(saved.rounds) <= 2
    assert [tab.label for tab in at.tabs] == [f"Round {record.round}" for record in saved.rounds]
    record = next(run for run in Registry().runs() if run.run_id == saved.run_id)
    assert (record.status, Path(record.path)) == ("done", run_dir)

    second.run()
    assert_clean(second)
    assert second.success and run_dir.name in second.success[0].value  # the run by its folder's name
    assert second.query_params["run"] == str(run_dir)
    assert len(runner.jobs()) == 1
    stranger.run()
    assert_clean(stranger)
    assert not stranger.success and "run" not in stranger.query_params  # the run is private to the session


def test_refine_cancel_stops_the_job_and_saves_nothing(home, runner, held_jobs):
    at = studio(REFINE)
    at.form_submit_button[0].click().run()
    held_jobs.wait_running()
    assert runner.status(at.query_params["job"]).state == "running"
    at.button(key="cancel_job").click().run()
    held_jobs.release.set()  # the fit starts, registers its run and stops at its first check
    wait_for_job(at, runner)
    assert not at.exception
    assert runner.status(at.query_params["job"]).state == "cancelled"
    assert at.warning and "cancelled" in at.warning[0].value
    assert "run" not in at.query_params
    assert list((home / "runs").iterdir()) == []  # no run folder, no half-written staging folder
    assert [(record.status, "cancel" in record.message) for record in Registry().runs()] == [("cancelled", True)]
    at.switch_page(script(RESULTS)).run()
    assert_clean(at)
    listed = next(frame for frame in frames(at) if "path" in frame.columns)
    assert list(listed["status"]) == ["cancelled"]  # not "failed": the user stopped it


def test_refine_trains_a_self_supervised_encoder_with_self_training(home, runner):
    at = studio(REFINE)
    at.selectbox(key="objective").set_value("contrastive").run()  # the training fields show once it is chosen
    at.number_input(key="epochs").set_value(1)
    at.number_input(key="retrain_epochs").set_value(1)
    at.number_input(key="rounds").set_value(2)
    at.select_slider(key="image_size").set_value(32)
    at.selectbox(key="localization").set_value("none")
    at.form_submit_button[0].click().run()
    wait_for_job(at, runner)
    assert_clean(at)
    assert at.success and at.success[0].value.startswith("Finished")
    saved = RunResults(at.query_params["run"])
    assert (saved.config.objective, saved.config.encoder, saved.config.retrain_epochs) == ("contrastive", "small-cnn", 1)
    assert (saved.run_dir / "ssl_encoder_round_1.safetensors").is_file()


def test_refine_rejects_a_gamma_that_is_not_a_number(home, runner):
    at = studio(REFINE)
    at.text_input(key="gamma").set_value("abc")
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert len(at.error) == 1 and "gamma must be a number" in at.error[0].value
    assert runner.jobs() == []
    assert "job" not in at.query_params


# ----------------------------------------------------------------------------------- Embeddings


def test_embeddings_map_colours_slices_and_selects(own_runs):  # the map caches its layout in the run
    at = studio(EMBEDDINGS, run=own_runs.images)
    assert_clean(at)
    assert len(charts(at)) == 1
    colour = at.selectbox(key="colour_by")
    assert "label" in colour.options and "anomaly_score" in colour.options
    colour.set_value("kept / removed").run()
    assert_clean(at)

    def legend(at) -> set[str]:
        return {trace.get("name") for trace in json.loads(charts(at)[0].proto.spec)["data"]}

    slider = at.slider(key="map_round")
    assert slider.value == len(RunResults(own_runs.images).rounds)
    assert legend(at) == {"kept", "removed"}
    slider.set_value(0).run()  # before refinement: nothing is removed yet
    assert_clean(at)
    assert legend(at) == {"kept"}

    run = RunResults(own_runs.images)
    selection = [3, 10, 200, 299]
    at.session_state["selection"] = selection  # what a lasso on the map leaves behind
    at.run()
    assert_clean(at)
    assert at.subheader[0].value == f"{len(selection)} selected"
    assert [button.key for button in at.button if (button.key or "").startswith("selected-")] == [
        f"selected-{i}" for i in range(len(selection))]
    most_anomalous = run.samples["id"].iat[max(selection, key=lambda i: run.samples["anomaly_score"].iat[i])]
    at.button(key="selected-0").click().run()
    assert_clean(at)
    assert at.title[0].value == "Inspect"
    assert at.subheader[0].value == most_anomalous


# -------------------------------------------------------------------------------------- Inspect


def test_inspect_pages_through_samples_and_records_a_verdict(own_runs):
    run = RunResults(own_runs.images)
    by_rank = run.samples.sort_values("rank")["id"].tolist()
    assert Registry().verdicts(run.fingerprint) == {}
    at = studio(INSPECT, run=own_runs.images)
    assert_clean(at)
    assert at.subheader[0].value == by_rank[0]
    shown = metrics(at)
    assert shown["Rank"] == "1 of 300"
    assert shown["anomaly_score"] == score_text(run.samples["anomaly_score"].max())  # as every page writes it
    assert any(caption.startswith("localization map") for caption in captions(at))

    at.button(key="next").click().run()
    assert_clean(at)
    assert metrics(at)["Rank"] == "2 of 300" and at.subheader[0].value == by_rank[1]

    at.text_input(key=f"note-{by_rank[1]}").set_value("scuffed toe")
    at.button(key="verdict-anomaly").click().run()
    assert_clean(at)
    assert Registry().verdicts(run.fingerprint) == {by_rank[1]: ("anomaly", "scuffed toe")}
    assert any(text.startswith("**Your verdict**: anomaly (scuffed toe)") for text in at.markdown.values)
    assert metrics(at)["Rank"] == "2 of 300"  # the verdict keeps the sample on screen


def test_inspect_shows_grad_cam_on_request(shared):
    at = studio(INSPECT, run=shared.images)
    assert not any(caption.startswith("Grad-CAM") for caption in captions(at))
    at.toggle(key="show_gradcam").set_value(True).run()
    assert_clean(at)
    assert any(caption.startswith("Grad-CAM") for caption in captions(at))


def test_inspect_explains_a_table_row_by_its_features(shared):
    at = studio(INSPECT, run=shared.table)
    assert_clean(at)
    assert metrics(at)["Rank"] == "1 of 200"
    bars = json.loads(charts(at)[0].proto.spec)
    assert bars["data"][0]["type"] == "bar" and len(bars["data"][0]["y"]) > 0
    features = at.dataframe[0].value
    assert list(features.columns) == ["feature", "value", "against the kept rows (typical: 5-95%)", "share of score"]
    assert len(features) == 64  # the whole row: every pixel column, the leading ones charted (largest on top)
    assert all(text.startswith(value + ": ") for text, value in zip(features.iloc[:, 2], features["value"]))
    charted = list(bars["data"][0]["y"])[::-1]
    assert list(features["feature"][:len(charted)]) == charted
    assert len(at.image) == 0


# -------------------------------------------------------------------------------------- Results


def test_results_threshold_curves_verdicts_rerun_and_runs(home, runner):
    at = studio()  # a table fitted from the studio: Data -> Refine -> Results
    digits = next(source for source in builtin_sources() if source.key == "digits")
    at.radio(key="builtin_choice").set_value(digits).run()
    at.button(key="use_builtin").click().run()
    at.switch_page(script(REFINE)).run()
    at.form_submit_button[0].click().run()
    wait_for_job(at, runner)
    first = Path(at.query_params["run"])
    run = RunResults(first)
    assert run.config.label_column == "label"  # so that reloading the run's data keeps labels out of the features
    at.switch_page(script(RESULTS)).run()
    assert_clean(at)
    assert len(charts(at)) == 3  # histogram, ROC, PR (the run has labels)
    assert {"AUROC", "Average precision", "F1 at the run's threshold"} <= set(metrics(at))
    scores = run.samples["anomaly_score"].to_numpy()

    def above_caption(at) -> str:
        return next(value for value in at.caption.values if "score above the threshold" in value)

    assert above_caption(at).startswith(f"{int(np.sum(scores > run.threshold))} of 200 samples")
    at.slider(key="threshold_share").set_value(50.0).run()  # flag half of the samples
    assert_clean(at)
    assert above_caption(at).startswith(f"{int(np.sum(scores > np.quantile(scores, 0.5)))} of 200 samples")
    assert int(above_caption(at).split()[0]) != int(np.sum(scores > run.threshold))
    at.radio(key="threshold_by").set_value("anomaly_score value").run()
    typed = float(np.quantile(scores, 0.9))
    at.number_input(key="threshold").set_value(typed).run()
    assert_clean(at)
    assert above_caption(at).startswith(f"{int(np.sum(scores > typed))} of 200 samples")
    assert {"download_scores", "download_bundle"} <= {button.key for button in at.get("download_button")}
    assert any(value.startswith("No verdicts yet") for value in at.caption.values)

    # An expert overrules the run twice: its most suspicious removed row is normal, its most typical
    # kept row is an anomaly.
    samples = run.samples.sort_values("rank")
    normal = samples[samples["kept"] == 0]["id"].iat[0]
    anomaly = samples[samples["kept"] == 1]["id"].iat[-1]
    Registry().set_verdict(run.fingerprint, normal, "normal")
    Registry().set_verdict(run.fingerprint, anomaly, "anomaly")
    at.run()
    assert_clean(at)
    agreement = next(frame for frame in frames(at) if "model normal" in frame.columns)
    assert int(agreement.to_numpy().sum()) == 2
    assert int(agreement.loc["normal"].sum()) == 1 and int(agreement.loc["anomaly"].sum()) == 1

    at.button(key="rerun_with_verdicts").click().run()
    assert_clean(at)
    assert at.title[0].value == "Refine"
    # The browser stays on the page st.switch_page opened; AppTest would rerun the last page given to
    # its own switch_page, so it is told where the user is.
    at.switch_page(script(REFINE))
    wait_for_job(at, runner)
    assert_clean(at)
    assert at.success and at.success[0].value.startswith("Finished")
    second = Path(at.query_params["run"])
    assert second != first and "-verdicts-" in second.name
    rerun = pd.read_csv(second / "scores.csv", dtype={"id": str}).set_index("id")
    assert rerun.loc[normal, "kept"] == 1 and rerun.loc[anomaly, "kept"] == 0
    assert "label" not in engine.open_run(second).encoder.feature_names
    assert len(runner.jobs()) == 2

    at.switch_page(script(RESULTS)).run()
    assert_clean(at)
    assert at.selectbox(key="compare_run").value == str(first)  # compared with the run it came from
    comparison = next(frame for frame in frames(at) if "kept" in frame.index)
    assert set(comparison.columns) == {first.name, second.name}  # runs by their folders' names, as everywhere
    past = next(frame for frame in frames(at) if "path" in frame.columns)
    assert set(past["path"]) == {str(first), str(second)} and set(past["status"]) == {"done"}


def plotted(chart) -> dict:
    """A page's plotly chart as its figure's JSON, with plotly's base64 typed arrays decoded to numpy arrays."""
    def decoded(value):
        if isinstance(value, dict) and "bdata" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            return array.reshape([int(n) for n in value["shape"].split(",")]) if "shape" in value else array
        if isinstance(value, dict):
            return {key: decoded(item) for key, item in value.items()}
        if isinstance(value, list):
            return [decoded(item) for item in value]
        return value

    return decoded(json.loads(chart.proto.spec))


def test_results_histogram_shows_every_score_and_readable_threshold_labels(shared):
    at = studio(RESULTS, run=shared.images)
    assert_clean(at)
    run = RunResults(shared.images)
    scores = run.samples["anomaly_score"].to_numpy()
    figure = plotted(charts(at)[0])
    axis = score_axis(scores)
    assert f"{axis.scale} scale" in figure["layout"]["xaxis"]["title"]["text"]  # the axis says how it is drawn
    low, high = axis.inverse(np.array(figure["layout"]["xaxis"]["range"]))
    assert low <= scores.min() and high >= scores.max()  # no cut axis: the top score is on it
    bars = [trace for trace in figure["data"] if trace["type"] == "bar"]
    assert sum(int(np.sum(bar["y"])) for bar in bars) == len(scores)
    labels = [note for note in figure["layout"]["annotations"] if "threshold" in note["text"]]
    assert len(labels) == 2 and len({note["y"] for note in labels}) == 2  # the two labels on rows of their own
    assert abs(labels[0]["y"] - labels[1]["y"]) * figure["layout"]["height"] / 2 >= labels[0]["font"]["size"]


def test_the_round_view_plots_the_votes_that_removed_each_sample(shared):
    at = studio(REFINE, run=shared.images)
    assert_clean(at)
    run = RunResults(shared.images)
    figures = [plotted(chart) for chart in charts(at)]
    votes = [figure for figure in figures
             if "detectors that flagged" in figure["layout"].get("xaxis", {}).get("title", {}).get("text", "")]
    assert len(votes) == len(run.rounds) >= 1
    for figure, record in zip(votes, run.rounds):
        bars = {bar["name"]: dict(zip(list(bar["x"]), bar["y"])) for bar in figure["data"]}
        assert sum(sum(counts.values()) for counts in bars.values()) == len(run.samples)
        assert sum(bars.get("removed in this round", {}).values()) == len(record.removed)
        assert all(count == 0 for v, count in bars["kept"].items() if v != 0)  # kept: no detector flagged it
        for name in ("removed in this round", "still out (removed earlier)"):
            assert bars.get(name, {}).get(0, 0) == 0  # nothing removed that no detector flagged
    strip = [caption for caption in captions(at) if " votes · margin " in caption]
    assert strip, "the removed samples are shown with their votes and consensus margin"
    by_id = run.samples.set_index("id")["anomaly_score"]
    for caption in strip:  # the run's anomaly_score, as Inspect and Results show it
        sample_id, shown = caption.split(" · ")[0], caption.split("anomaly_score ")[1].split(" ")[0]
        assert shown == score_text(by_id[sample_id])


def test_every_page_and_the_sidebar_name_the_run_by_its_folder(shared):
    name = shared.images.name
    at = studio(run=shared.images)
    assert name in at.sidebar.caption.values  # (AppTest draws the sidebar on the first page only)
    at.switch_page(script(REFINE)).run()
    assert at.subheader[0].value == f"Run {name}"
    at.switch_page(script(RESULTS)).run()
    assert_clean(at)
    assert any(value.startswith(f"Run {name} (id {run_id(shared.images)})") for value in at.caption.values)
    listed = next(frame for frame in frames(at) if "path" in frame.columns).set_index("path")
    assert listed.loc[str(shared.images), "run"] == name
    assert at.selectbox(key="open_run").format_func(str(shared.images)) == name


def test_the_runs_table_shows_the_settings_that_tell_runs_apart(shared):
    at = studio(RESULTS, run=shared.images)
    listed = next(frame for frame in frames(at) if "path" in frame.columns).set_index("path")
    for folder in (shared.images, shared.table):
        run = RunResults(folder)
        row = listed.loc[str(folder)]
        config = run.config
        assert (row["detector"], row["objective"]) == (config.detector, config.objective)
        assert row["K (ensemble)"] == f"{config.ensemble} × {config.refine_detector}"
        assert row["rounds"] == str(config.rounds)
        assert row["gamma"] == (f"auto: {run.contamination:.1%}" if config.gamma == "auto" else str(config.gamma))
        assert row["image size"] == (f"{config.image_size} px" if run.kind == "images" else "-")


# ----------------------------------------------------------------------------------- Navigation


def test_the_run_opened_on_results_stays_active_across_page_changes(shared):
    at = studio(RESULTS)  # no run in the URL: the newest finished run, the table
    assert at.query_params["run"] == str(shared.table)
    at.selectbox(key="open_run").set_value(str(shared.images)).run()
    at.button(key="open_run_button").click().run()
    assert_clean(at)
    assert at.query_params["run"] == str(shared.images)
    at.query_params.clear()  # what the navigation menu does to the URL on every page change
    at.switch_page(script(INSPECT)).run()
    assert_clean(at)
    assert metrics(at)["Rank"] == "1 of 300"  # still the image run, not the newest run
    assert at.query_params["run"] == str(shared.images)  # and back in the URL, ready to share


# ------------------------------------------------------------------------------------- Sessions


def shown_runs(at) -> set[Path]:
    """The run folders in the Results page's run list."""
    return {Path(path) for path in next(frame for frame in frames(at) if "path" in frame.columns)["path"]}


def share_toggles(at) -> dict[str, bool]:
    """The Results page's share switches by key (``share-<run id>``), with their values."""
    return {toggle.key: toggle.value for toggle in at.toggle if (toggle.key or "").startswith("share-")}


def test_a_new_browser_gets_its_own_session_and_its_url_keeps_it(home):
    first = studio()
    key = first.query_params["session"]
    assert len(key) >= 43
    assert studio(url=first.query_params).query_params["session"] == key  # a reload, or the URL in a second tab
    assert studio().query_params["session"] != key  # another browser
    first.query_params.clear()  # what the navigation menu does to the URL on every page change
    first.switch_page(script(REFINE)).run()
    assert first.query_params["session"] == key
    assert studio(url={"session": "guessable"}).query_params["session"] != "guessable"  # a malformed key is replaced


def test_sessions_see_only_their_own_runs_until_one_is_shared(home):
    alice, bob = (studio().query_params["session"] for _ in range(2))
    cli_run = fit_digits_run(home)  # the command line's: visible to every session
    runs = {key: fit_digits_run(home, session=session_id(studio(url={"session": key}))) for key in (alice, bob)}
    for key in (alice, bob):
        at = studio(url={"session": key})
        assert at.query_params["run"] == str(runs[key])  # its own newest run, not the other session's
        assert runs[key].name in at.sidebar.caption.values
        at.switch_page(script(RESULTS)).run()
        assert_clean(at)
        assert shown_runs(at) == {runs[key], cli_run}
        assert share_toggles(at) == {f"share-{run_id(runs[key])}": False}

    # Bob shares his run: Alice lists it and can open it, but cannot unshare it.
    bobs = studio(RESULTS, url={"session": bob})
    bobs.toggle(key=f"share-{run_id(runs[bob])}").set_value(True).run()
    assert_clean(bobs)
    assert Registry().run_at(runs[bob]).shared
    alices = studio(RESULTS, url={"session": alice}, run=runs[alice])
    assert shown_runs(alices) == {runs[alice], runs[bob], cli_run}
    alices.selectbox(key="open_run").set_value(str(runs[bob])).run()
    alices.button(key="open_run_button").click().run()
    assert_clean(alices)
    assert alices.query_params["run"] == str(runs[bob])
    assert share_toggles(alices) == {}
    assert any(run_id(runs[bob]) in value for value in alices.caption.values)

    # Bob makes it private again: Alice's page, still on it, now refuses it.
    bobs.toggle(key=f"share-{run_id(runs[bob])}").set_value(False).run()
    alices.run()
    assert not alices.exception
    assert [warning.value for warning in alices.warning] == [FOREIGN_RUN]
    assert shown_runs(alices) == {runs[alice], cli_run}  # her own runs stay to open one


@pytest.mark.parametrize("page", [REFINE, EMBEDDINGS, INSPECT, RESULTS], ids=lambda page: page.title)
@pytest.mark.parametrize("browser", ["own session", "new browser"])
def test_a_link_to_another_sessions_private_run_shows_a_message_instead(home, page, browser):
    owner = studio()
    private = fit_digits_run(home, session=session_id(owner))
    visitor = studio() if browser == "own session" else None
    url = {"session": visitor.query_params["session"]} if visitor else {}
    at = studio(url=url, run=private)
    assert "another session's run (not shown)" in at.sidebar.caption.values
    at.switch_page(script(page)).run()
    assert not at.exception, at.exception
    assert not at.error, [error.value for error in at.error]
    assert [warning.value for warning in at.warning] == [FOREIGN_RUN]
    assert run_id(private) not in " ".join(at.subheader.values + at.caption.values + at.markdown.values)
    assert not charts(at) and not at.dataframe  # nothing of the run: no map, scores, rounds or run list
    assert studio(page, url=owner.query_params, run=private).warning.values == []  # its owner opens it


def test_a_link_to_another_sessions_job_shows_a_message_instead(home, runner, held_jobs):
    owner = studio(REFINE)
    owner.form_submit_button[0].click().run()
    job_id = owner.query_params["job"]
    held_jobs.wait_running()
    visitor = studio(REFINE, url={"job": job_id})
    assert not visitor.exception and not visitor.error
    assert [warning.value for warning in visitor.warning] == [FOREIGN_JOB]
    assert not visitor.get("progress")
    assert "cancel_job" not in [button.key for button in visitor.button]  # neither watched nor cancellable
    assert not visitor.form_submit_button[0].disabled  # its own fit would queue behind
    owner.button(key="cancel_job").click().run()
    held_jobs.release.set()
    wait_for_job(owner, runner)
    visitor.run()
    assert [warning.value for warning in visitor.warning] == [FOREIGN_JOB] and not visitor.success


def test_a_session_lists_only_its_own_earlier_uploads(home):
    owner, visitor = studio(), studio()
    table = pd.DataFrame(np.random.default_rng(0).normal(size=(40, 3)), columns=["a", "b", "c"])
    upload = save_uploads([("sensors.csv", table.to_csv(index=False).encode())], home / "workspace",
                          session=session_id(owner))
    assert upload.parent.parent.name == session_id(owner)
    owner.run()
    visitor.run()
    assert owner.selectbox(key="earlier_upload").options == ["sensors.csv"]
    assert "earlier_upload" not in [box.key for box in visitor.selectbox]
    owner.button(key="use_earlier_upload").click().run()
    assert_clean(owner)
    assert owner.session_state["data_path"] == str(upload)
    assert (metrics(owner)["Kind"], metrics(owner)["Samples"]) == ("table", "40")


@pytest.mark.parametrize("where", ["uploads", "workspace", "home", "above home"])
def test_the_server_path_field_refuses_refinerys_own_storage(home, where):
    owner, visitor = studio(), studio()
    upload = save_uploads([("a.png", sorted((DEMO_DIR / "good").glob("*.png"))[0].read_bytes())], home / "workspace",
                          session=session_id(owner))
    typed = {"uploads": upload, "workspace": home / "workspace", "home": home, "above home": home.parent}[where]
    visitor.text_input(key="server_path").set_value(str(typed)).run()
    visitor.button(key="use_server").click().run()
    assert not visitor.exception
    assert len(visitor.error) == 1 and "Refinery keeps every session's uploads and runs" in visitor.error[0].value
    assert visitor.session_state["data_path"] == str(DEMO_DIR)


# ----------------------------------------------------------------------------------- Standalone


@pytest.mark.parametrize(("page", "needs_a_run"), [(DATA, False), (REFINE, False), (EMBEDDINGS, True), (INSPECT, True),
                                                  (RESULTS, True)], ids=["Data", "Refine", "Embeddings", "Inspect", "Results"])
def test_every_page_runs_on_its_own_without_a_run(home, page, needs_a_run):
    at = standalone(page)
    assert_clean(at)
    assert at.title[0].value == page.title
    assert any(info.value.startswith("No run yet") for info in at.info) is needs_a_run
    assert not at.get("page_link")  # without app.py's navigation there is no other page to link to


@pytest.mark.parametrize("page", [REFINE, RESULTS], ids=lambda page: page.title)
def test_pages_with_links_run_on_their_own_with_a_run(shared, page):
    at = standalone(page, run=shared.table)
    assert_clean(at)
    assert any(run_id(shared.table) in value for value in at.subheader.values + at.caption.values)
    assert not at.get("page_link")


def test_links_between_pages_open_the_pages_the_navigation_defines(shared):
    """Each link leads to its page's URL, under the page's own icon unless it says otherwise."""
    links = [link.proto for link in studio(DATA).get("page_link")]
    assert [(link.page, link.label, link.icon) for link in links] == [
        ("refine", "Next: refine this data", ":material/arrow_forward:")]
    links = [link.proto for link in studio(REFINE, run=shared.table).get("page_link")]
    assert [(link.page, link.icon) for link in links] == [
        ("embeddings", EMBEDDINGS.icon), ("inspect", INSPECT.icon), ("results", RESULTS.icon)]


def test_a_page_that_needs_a_run_links_to_the_refine_page(home):
    links = [link.proto for link in studio(EMBEDDINGS).get("page_link")]  # no run yet
    assert [(link.page, link.label, link.icon) for link in links] == [("refine", "Refine", REFINE.icon)]


# --------------------------------------------------------------------------------------- Config


@pytest.fixture(scope="module")
def server_config() -> dict:
    return tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())


def test_streamlit_config_is_local_and_quiet(server_config):
    assert server_config["server"]["address"] == "localhost"
    assert server_config["server"]["enableXsrfProtection"] is True
    assert server_config["client"]["showErrorDetails"] == "none"


def test_reruns_do_not_force_a_full_garbage_collection(server_config):
    """Streamlit's default collects every generation after each rerun, fragments included. A live view
    reruns every LIVE_REFRESH_S, and a full collection with torch loaded takes about 0.25 s under the GIL:
    the fit's thread starved (the two-sessions browser test's fits took 55 s instead of 10)."""
    assert server_config["runner"]["postScriptGC"] is False


def test_the_upload_limit_is_stated_the_same_everywhere(server_config, home):
    assert server_config["server"]["maxUploadSize"] * 1024**2 == MAX_UPLOAD_BYTES  # Streamlit's MB are MiB
    stated = f"{MAX_UPLOAD_BYTES // 1024**2} MiB"
    assert stated in studio().get("file_uploader")[0].help
    for doc in ("README.md", "SECURITY.md"):
        text = (ROOT / doc).read_text()
        assert stated in text and f"{MAX_UPLOAD_BYTES // 1024**2} MB" not in text, doc


# ------------------------------------------------------------------- Verdicts follow the data (issue 14.5)
# A verdict belongs to a sample of the data (fingerprint, sample id), so every run on that data shows it.


def judged_frame(at) -> pd.DataFrame:
    """The Results page's list of the judged samples."""
    return next(frame for frame in frames(at) if {"verdict", "model"} <= set(frame.columns))


def open_sample(at, sample_id: str):
    """Open ``sample_id`` on the Inspect page, as a link from another page does."""
    at.switch_page(script(INSPECT))
    at.session_state["inspect_id"] = sample_id
    return at.run()


def test_a_verdict_on_one_run_shows_on_another_run_of_the_same_data(own_runs):
    first = own_runs.table
    second = fit_digits_run(own_runs.home)  # a second, independent fit of the same table
    assert RunResults(second).fingerprint == RunResults(first).fingerprint and run_id(second) != run_id(first)
    at = studio(INSPECT, run=first)
    sample = at.subheader[0].value
    at.text_input(key=f"note-{sample}").set_value("odd loop")
    at.button(key="verdict-anomaly").click().run()
    assert_clean(at)

    on_second = studio(url={"session": at.query_params["session"]}, run=second)  # the same browser, run B
    open_sample(on_second, sample)
    assert_clean(on_second)
    assert on_second.subheader[0].value == sample
    assert "**Your verdict**: anomaly (odd loop)" in on_second.markdown.values
    on_second.switch_page(script(RESULTS)).run()
    assert_clean(on_second)
    assert not any(value.startswith("No verdicts yet") for value in on_second.caption.values)
    judged = judged_frame(on_second)
    assert judged[["id", "verdict", "note"]].values.tolist() == [[sample, "anomaly", "odd loop"]]
    on_second.switch_page(script(EMBEDDINGS)).run()
    assert_clean(on_second)
    assert "verdict" in on_second.selectbox(key="colour_by").options


def test_a_rerun_with_the_verdicts_shows_them_and_its_round_view_names_the_confirmed_anomalies(own_runs, runner):
    run = RunResults(own_runs.table)
    samples = run.samples.sort_values("rank")
    confirmed = samples[samples["kept"] == 1]["id"].iat[-1]  # the most typical kept row, confirmed anomalous
    normal = samples[samples["kept"] == 0]["id"].iat[0]
    at = studio(run=own_runs.table)
    for sample, button in ((confirmed, "verdict-anomaly"), (normal, "verdict-normal")):
        open_sample(at, sample)
        at.button(key=button).click().run()
    at.switch_page(script(RESULTS)).run()
    at.button(key="rerun_with_verdicts").click().run()
    assert_clean(at)
    at.switch_page(script(REFINE))
    wait_for_job(at, runner)
    assert_clean(at)
    rerun = Path(at.query_params["run"])
    assert rerun != own_runs.table

    removed = [frame for frame in frames(at) if "consensus margin" in frame.columns]
    assert removed, "the round view lists the removed rows"
    first_round = removed[0].set_index("id")
    assert first_round.loc[confirmed, "votes"] == "confirmed anomaly (expert)"
    cells = [str(value).lower() for frame in removed for value in frame.to_numpy().ravel()]
    assert "nan" not in cells and "none" not in cells

    at.switch_page(script(RESULTS)).run()
    assert_clean(at)
    assert any(value.startswith(f"Run {rerun.name}") for value in at.caption.values)
    assert not any(value.startswith("No verdicts yet") for value in at.caption.values)
    shown = judged_frame(at).set_index("id")["verdict"].to_dict()
    assert shown == {confirmed: "anomaly", normal: "normal"}


def test_results_list_the_samples_where_the_expert_and_the_model_disagree(own_runs):
    run = RunResults(own_runs.table)
    samples = run.samples.sort_values("rank")
    flagged, called_normal = samples[samples["is_anomaly"] == 1]["id"], samples[samples["is_anomaly"] == 0]["id"]
    verdicts = {flagged.iat[0]: "anomaly", flagged.iat[1]: "normal", flagged.iat[2]: "unsure",
                called_normal.iat[0]: "anomaly", called_normal.iat[1]: "normal"}
    for sample, verdict in verdicts.items():
        Registry().set_verdict(run.fingerprint, sample, verdict, "checked")
    at = studio(RESULTS, run=own_runs.table)
    assert_clean(at)
    listed = [button.key.removeprefix("disagree-") for button in at.button if (button.key or "").startswith("disagree-")]
    assert listed == [flagged.iat[1], called_normal.iat[0]]  # most anomalous first
    agreement = next(frame for frame in frames(at) if "model normal" in frame.columns)
    assert int(agreement.to_numpy().sum()) == len(verdicts)

    at.button(key=f"disagree-{called_normal.iat[0]}").click().run()
    assert_clean(at)
    assert at.title[0].value == "Inspect" and at.subheader[0].value == called_normal.iat[0]
    assert "**Your verdict**: anomaly (checked)" in at.markdown.values


# ------------------------------------------------------ The session keeps its place; progress you can see (issue 14.2, 14.6)


def in_order(block) -> list:
    """Every element and block under ``block``, depth first, in the order the page draws them."""
    found = []
    for child in block.children.values():
        found.append(child)
        if hasattr(child, "children"):
            found.extend(in_order(child))
    return found


def use_builtin(at, key: str):
    source = next(source for source in builtin_sources() if source.key == key)
    at.radio(key="builtin_choice").set_value(source).run()
    return at.button(key="use_builtin").click().run()


def test_a_reload_restores_the_data_named_in_the_url(home):
    at = use_builtin(studio(), "digits")
    assert_clean(at)
    assert (at.query_params["data"], at.query_params["label"]) == ("builtin:digits", "label")
    at.switch_page(script(REFINE)).run()  # a page change clears the URL; the session puts the data back
    assert at.query_params["data"] == "builtin:digits"

    reloaded = studio(url=dict(at.query_params))  # a new script session on the same URL: a reload
    assert_clean(reloaded)
    assert reloaded.session_state["data_path"] == at.session_state["data_path"]
    assert reloaded.session_state["column_choice"] == ColumnChoice(label_column="label")
    assert (metrics(reloaded)["Kind"], metrics(reloaded)["Samples"]) == ("table", "200")
    assert Path(at.session_state["data_path"]).name in reloaded.sidebar.caption.values
    reloaded.switch_page(script(REFINE)).run()
    assert reloaded.caption[0].value.startswith("Training data: 200 rows")


def test_a_url_cannot_open_another_sessions_upload(home):
    owner = studio()
    table = pd.DataFrame(np.random.default_rng(0).normal(size=(40, 3)), columns=["a", "b", "c"])
    upload = save_uploads([("sensors.csv", table.to_csv(index=False).encode())], home / "workspace",
                          session=session_id(owner))
    owner.run()
    owner.button(key="use_earlier_upload").click().run()
    assert_clean(owner)
    assert owner.session_state["data_path"] == str(upload)
    assert studio(url=dict(owner.query_params)).session_state["data_path"] == str(upload)  # its owner reloads
    stranger = studio(url={"data": owner.query_params["data"]})
    assert not stranger.exception
    assert stranger.session_state["data_path"] == str(DEMO_DIR)
    assert [toast.value for toast in stranger.toast] and "not one of this session's uploads" in stranger.toast[0].value
    assert stranger.query_params["data"] == "builtin:demo"


def test_a_refused_upload_keeps_the_previous_data(home):
    at = use_builtin(studio(), "digits")
    chosen = at.session_state["data_path"]
    archive = (home / "good.zip")
    shutil.make_archive(str(archive.with_suffix("")), "zip", DEMO_DIR)
    truncated = archive.read_bytes()[: archive.stat().st_size // 2]  # an upload cut off half-way
    save_uploads([("images.zip", truncated)], home / "workspace", session=session_id(at))
    at.run()
    at.button(key="use_earlier_upload").click().run()
    assert not at.exception
    assert len(at.error) == 1  # the refusal, said once, above the data that stays active
    assert at.session_state["data_path"] == chosen and at.query_params["data"] == "builtin:digits"
    assert (metrics(at)["Kind"], metrics(at)["Samples"]) == ("table", "200")
    at.switch_page(script(REFINE)).run()
    assert_clean(at)
    assert at.caption[0].value.startswith("Training data: 200 rows")


def test_a_running_job_shows_plain_progress_above_the_folded_settings(home, runner):
    at = studio(REFINE)
    reported, release = threading.Event(), threading.Event()

    def work(context):  # a job of this session, reporting as the fit's localization stage does
        context.plan([("embed", 1.0), ("patch_fit", 1.0)])
        context.on_progress(ProgressEvent("embed", 10, 10))
        context.on_progress(ProgressEvent("patch_fit", 3, 10))
        reported.set()
        release.wait(HOLD_S)

    job_id = runner.submit("fit demo", work, owner=session_id(at))
    try:
        assert reported.wait(HOLD_S)
        at.run()
        assert_clean(at)
        assert at.query_params["job"] == job_id
        bar = at.get("progress")[0]
        assert bar.value == 65  # the whole job: embedding done (half), then 3 of 10 in the second half
        assert bar.proto.text.startswith("**learning what normal patches look like (3/10)**")
        assert "patch_fit" not in bar.proto.text
        sidebar = studio(url=dict(at.query_params)).sidebar.caption.values  # (AppTest draws it on the first page only)
        assert "fit demo: running (learning what normal patches look like (3/10))" in sidebar
        order = in_order(at.main)
        settings = next(block for block in order if getattr(block, "type", "") == "expander")
        assert order.index(bar) < order.index(settings)  # the live view first, the settings below it
        assert settings.proto.expanded is False  # folded away while the job runs
        assert settings.label == "Settings of the next fit"
        assert at.form_submit_button[0].disabled
    finally:
        release.set()


def test_fields_that_do_not_apply_are_hidden(home):
    at = studio(REFINE)
    assert at.selectbox(key="objective").value == "none"
    shown = {element.key for element in [*at.number_input, *at.selectbox]}
    assert not {"epochs", "retrain_epochs", "encoder"} & shown
    at.selectbox(key="objective").set_value("rotation").run()
    shown = {element.key for element in [*at.number_input, *at.selectbox]}
    assert {"epochs", "retrain_epochs", "encoder"} <= shown and {"backbone", "localization"} <= shown
    use_builtin(at.switch_page(script(DATA)).run(), "digits").switch_page(script(REFINE)).run()
    assert_clean(at)
    shown = {element.key for element in [*at.number_input, *at.selectbox, *at.select_slider]}
    assert not {"backbone", "image_size", "localization"} & shown  # image-only settings, for a table
    assert "refine_detector" in shown


def test_a_fit_leaves_its_map_laid_out_for_the_embeddings_page(home, runner):
    at = use_builtin(studio(), "digits").switch_page(script(REFINE)).run()
    at.number_input(key="rounds").set_value(1)
    at.form_submit_button[0].click().run()
    wait_for_job(at, runner)
    assert_clean(at)
    cached = Path(at.query_params["run"]) / "layouts.safetensors"
    assert cached.is_file()  # laid out by the fit job
    written = cached.stat().st_mtime_ns
    at.switch_page(script(EMBEDDINGS)).run()
    assert_clean(at)
    assert len(charts(at)) == 1 and cached.stat().st_mtime_ns == written  # the page read it, computed nothing


def test_the_sidebar_names_the_run_of_a_finished_rerun_at_once(own_runs, runner):
    key = secrets.token_urlsafe(32)  # the studio session that re-runs the run it has open
    dataset = engine.load_data(prepare_builtin("digits", own_runs.home / "workspace"), label_column="label")
    out_dir = engine.new_run_dir("rerun", root=own_runs.home / "runs")
    work = engine.fit_work(dataset, engine.suggested_config(dataset).with_changes(rounds=1, label_column="label"),
                           out_dir, registry=Registry(), session=session_id_of(key))
    job_id = runner.submit("fit rerun", work, owner=session_id_of(key))  # as Results' re-run button does
    assert runner.wait(job_id, 120).state == "done"
    at = studio(url={"session": key, "job": job_id, "run": str(own_runs.images)})  # (AppTest draws the sidebar on its first run only)
    assert_clean(at)
    assert out_dir.name in at.sidebar.caption.values and own_runs.images.name not in at.sidebar.caption.values
    assert at.query_params["run"] == str(out_dir)


def test_the_map_shows_removed_in_red_and_kept_in_blue(own_runs):  # the map caches its layout in the run
    at = studio(EMBEDDINGS, run=own_runs.images)
    at.selectbox(key="colour_by").set_value("kept / removed").run()
    assert_clean(at)
    colours = {trace["name"]: trace["marker"].get("color") for trace in json.loads(charts(at)[0].proto.spec)["data"]}
    assert colours == {"kept": KEPT_COLOUR, "removed": REMOVED_COLOUR}


# ---------------------------------------------------------------------------- Column roles (issue 15)
# A table's columns each have a role (id, feature, label, ignore), shown and changed on the Data page;
# the table's own ids key every output.


def use_payments(at, home: Path, table: pd.DataFrame | None = None):
    """Upload ``table`` (default :func:`fraud_table`) as ``payments.csv`` in ``at``'s session and use it."""
    table = fraud_table() if table is None else table
    save_uploads([("payments.csv", table.to_csv(index=False).encode())], home / "workspace", session=session_id(at))
    at.run()
    return at.button(key="use_earlier_upload").click().run()


def shown_roles(at) -> dict[str, str]:
    """The role of each column in the Data page's Columns panel."""
    return at.data_editor[0].value.set_index("column")["role"].to_dict()


def apply_roles(at, roles: dict[str, str]):
    """Pick ``roles`` (column -> role) in the Columns panel, as the user does in its role column, and apply them."""
    editor = at.data_editor[0]
    rows = list(editor.value["column"])
    at.session_state[editor.key] = {"edited_rows": {rows.index(name): {"role": role} for name, role in roles.items()},
                                    "added_rows": [], "deleted_rows": []}
    at.run()
    return at.button(key="apply_roles").click().run()


def training_caption(at) -> str:
    """The Refine page's line on what it trains on."""
    return next(value for value in at.switch_page(script(REFINE)).run().caption.values
                if value.startswith("Training data"))


def test_the_data_page_shows_each_columns_role_and_applied_roles_reload_the_data(home):
    at = use_payments(studio(), home)
    assert_clean(at)
    assert shown_roles(at) == {"record": "id", "amount": "feature", "duration": "feature", "site": "feature",
                               "is_fraud": "label"}
    assert list(at.dataframe[0].value.index[:2]) == ["REC-000100", "REC-000101"]  # the preview, by the table's ids
    assert metrics(at)["Labelled anomalous"] == "20"
    assert not {"label", "id", "ignore"} & set(at.query_params)  # found, not chosen: a reload finds them again
    assert training_caption(at).startswith("Training data: 200 rows of 3 feature columns")

    at.switch_page(script(DATA)).run()
    apply_roles(at, {"site": "ignore"})
    assert_clean(at)
    assert shown_roles(at)["site"] == "ignore"
    chosen = ColumnChoice(label_column="is_fraud", id_column="record", ignore_columns=("site",))
    assert at.session_state["column_choice"] == chosen
    assert [at.query_params[name] for name in ("label", "id", "ignore")] == ["is_fraud", "record", "site"]
    assert training_caption(at).startswith("Training data: 200 rows of 2 feature columns")

    reloaded = studio(url=dict(at.query_params))  # a reload keeps the roles
    assert_clean(reloaded)
    assert reloaded.session_state["column_choice"] == chosen
    assert shown_roles(reloaded)["site"] == "ignore"
    assert training_caption(reloaded).startswith("Training data: 200 rows of 2 feature columns")


def test_roles_that_cannot_apply_are_refused_and_the_data_keeps_its_roles(home):
    at = use_payments(studio(), home)
    apply_roles(at, {"amount": "id"})  # a second id
    assert not at.exception
    assert len(at.error) == 1 and "at most one id column, not record and amount" in at.error[0].value
    apply_roles(at, {"record": "feature", "site": "id"})  # an id column that repeats its values
    assert not at.exception
    assert len(at.error) == 1 and "'site' must name each row once" in at.error[0].value
    assert at.session_state["column_choice"] == ColumnChoice()
    assert shown_roles(at)["record"] == "id" and "id" not in at.query_params
    assert training_caption(at).startswith("Training data: 200 rows of 3 feature columns")


def test_a_column_that_a_fit_would_refuse_is_named_with_the_role_that_fixes_it(home):
    notes = fraud_table().assign(note=[f"call {i % 60}" for i in range(200)])  # 60 distinct texts: not a category
    at = use_payments(studio(), home, notes)
    assert_clean(at)
    assert shown_roles(at)["note"] == "feature"
    warned = [warning.value for warning in at.warning]
    assert len(warned) == 1 and "note" in warned[0]
    assert "set its role to id if it names rows, else to ignore" in warned[0]
    at.switch_page(script(REFINE)).run()
    assert [warning.value for warning in at.warning] == warned  # said again before Start
    at.switch_page(script(DATA)).run()
    apply_roles(at, {"note": "ignore"})
    assert_clean(at)
    assert not at.warning


def test_a_table_fit_names_its_rows_by_the_tables_ids_on_every_page(home, runner):
    table = fraud_table()
    ids = set(table["record"])
    at = apply_roles(use_payments(studio(), home, table), {"site": "ignore"})
    at.switch_page(script(REFINE)).run()
    at.number_input(key="rounds").set_value(1)
    at.form_submit_button[0].click().run()
    wait_for_job(at, runner)
    assert_clean(at)
    run_dir = Path(at.query_params["run"])
    run = RunResults(run_dir)
    assert set(pd.read_csv(run_dir / "scores.csv", dtype={"id": str})["id"]) == ids
    assert run.config.column_choice() == ColumnChoice(label_column="is_fraud", id_column="record", ignore_columns=("site",))
    assert list(engine.open_run(run_dir).encoder.feature_names) == ["amount", "duration"]
    by_id = run.samples.set_index("id")["anomaly_score"]
    removed = next(frame for frame in frames(at) if "consensus margin" in frame.columns)
    assert len(removed) and set(removed["id"]) <= ids
    assert list(removed["anomaly_score"]) == [score_text(by_id[i]) for i in removed["id"]]
    by_record = table.set_index("record")
    assert list(removed["amount"]) == [f"{by_record.loc[i, 'amount']:.6g}" for i in removed["id"]], "rows in context"
    assert "amount" in removed["outside the kept rows' 5-95%"].iat[0], "the planted amounts lie outside the kept range"

    at.switch_page(script(EMBEDDINGS)).run()
    assert_clean(at)
    hover = [text for trace in json.loads(charts(at)[0].proto.spec)["data"] for text in trace["text"]]
    assert {text.split(" · ")[0] for text in hover} == ids
    first = table.set_index("record").loc[run.samples["id"].iat[0]]
    assert hover[0].endswith(f"<br>amount {first['amount']:.6g} · duration {first['duration']:.6g}"), "the row's values"
    colour = at.selectbox(key="colour_by")
    assert {"column: amount", "column: duration"} <= set(colour.options)  # features only: site was ignored
    colour.set_value("column: amount").run()
    assert_clean(at)
    marker = json.loads(charts(at)[0].proto.spec)["data"][0]["marker"]
    assert marker["colorbar"]["title"]["text"] == "column: amount"
    assert marker["cmax"] == pytest.approx(table["amount"].quantile(0.98), rel=1e-6), "coloured by the amounts"
    at.session_state["selection"] = [0, 1]
    at.run()
    selected = frames(at)[0]
    assert list(selected["id"]) == sorted(run.samples["id"][:2], key=lambda i: -by_id[i])
    assert list(selected["amount"]) == list(table.set_index("record").loc[selected["id"], "amount"]), "rows in context"

    at.switch_page(script(INSPECT)).run()
    at.text_input(key="go_to_id").set_value("REC-000123").run()
    assert_clean(at)
    assert at.subheader[0].value == "REC-000123"
    row = table.set_index("record").loc["REC-000123"]
    whole = frames(at)[0].set_index("feature")
    assert sorted(whole.index) == ["amount", "duration"]  # every feature of the row; site was ignored
    for name in ("amount", "duration"):
        assert whole.loc[name, "value"] == f"{row[name]:.6g}"  # as written, no float noise
    at.text_input(key="go_to_id").set_value("REC-999999").run()
    assert not at.exception
    assert "no sample with id 'REC-999999'" in at.warning[0].value and at.subheader[0].value == "REC-000123"

    at.switch_page(script(RESULTS)).run()
    assert_clean(at)
    [by_column] = [c.value for c in at.caption if c.value.startswith("What makes the flagged rows' scores, by column")]
    assert "amount" in by_column and "duration" in by_column and "site" not in by_column
    assert "download_scores" in {button.key for button in at.get("download_button")}
    assert set(run.export_frame({})["id"]) == ids  # what the button downloads


# ----------------------------------------------------------------------------- The review queue (issue 17.3)


def test_inspect_review_queue_shows_its_progress_and_brings_up_the_next_unjudged_sample(own_runs):
    from core.review import call_precision, review_order, review_progress
    from pages.inspect import REVIEW_QUEUE

    run = RunResults(own_runs.images)
    expected = run.samples["id"].to_numpy()[review_order(run.samples, run.rounds, run.threshold, [])]
    queued = review_progress(run.samples, run.rounds, run.threshold, []).queued
    assert queued > 0, "the demo run has samples near its threshold, split or back after removal"
    at = studio(INSPECT, run=own_runs.images)
    at.button_group(key="inspect_queue").set_value(REVIEW_QUEUE).run()
    assert_clean(at)
    assert at.subheader[0].value == expected[0]
    assert f"judged 0 of {queued} in the queue" in at.caption.values
    assert not any(text.startswith("the model's anomaly calls") for text in at.caption.values), "no verdict yet"

    at.button(key="verdict-normal").click().run()
    assert_clean(at)
    assert at.subheader[0].value == expected[1], "the next unjudged sample comes up"
    assert f"judged 1 of {queued} in the queue" in at.caption.values

    most_anomalous = run.samples.sort_values("rank")["id"].iat[0]  # called an anomaly; judged on another page
    Registry().set_verdict(run.fingerprint, most_anomalous, "anomaly", run_id=run.run_id)
    at.run()
    assert_clean(at)
    precision = call_precision(run.samples, Registry().verdicts(run.fingerprint))
    assert precision is not None and precision.text in at.caption.values
    assert precision.text.startswith("the model's anomaly calls were right for ")


def test_a_reload_of_inspect_comes_back_to_the_same_list_and_sample(own_runs):
    from core.review import review_order
    from pages.inspect import REVIEW_QUEUE

    run = RunResults(own_runs.images)
    second = run.samples["id"].to_numpy()[review_order(run.samples, run.rounds, run.threshold, [])][1]
    at = studio(INSPECT, run=own_runs.images)
    at.button_group(key="inspect_queue").set_value(REVIEW_QUEUE).run()
    at.button(key="next").click().run()
    assert_clean(at)
    assert at.subheader[0].value == second
    url = {name: at.query_params[name] for name in ("session", "run", "list", "sample")}
    assert url["list"] == "review" and url["sample"] == second

    reloaded = studio(INSPECT, url=url)  # a new browser session on the same URL
    assert_clean(reloaded)
    assert reloaded.button_group(key="inspect_queue").value == REVIEW_QUEUE
    assert reloaded.subheader[0].value == second


# ----------------------------------------------------------------------------------------- Score (issue 17)


def score_server_folder(at, folder: Path, runner, name: str = ""):
    """Score ``folder`` from the Score page's server-path tab and wait for the job."""
    if name:
        at.text_input(key="batch_name").set_value(name)
    at.text_input(key="score_server_path").set_value(str(folder)).run()
    at.button(key="score_use_server").click().run()
    assert_clean(at)
    return wait_for_job(at, runner)


def test_the_score_page_scores_a_batch_that_opens_on_inspect_and_embeddings(own_runs, runner, tmp_path):
    from app_fixtures import new_images
    from core.batches import BatchResults, batch_names
    from pages.components.navigation import SCORE

    at = studio(SCORE, run=own_runs.images)
    assert_clean(at)
    assert "None yet: score new data above." in at.caption.values
    at = score_server_folder(at, new_images(tmp_path / "new"), runner, name="monday")
    assert_clean(at)
    [name] = batch_names(own_runs.images)
    batch = BatchResults(own_runs.images, name)
    assert "monday" in name and len(batch.samples) == 12 and at.query_params["batch"] == name
    assert any(f"Saved as batch {name}" in message.value for message in at.success)
    assert frames(at)[0]["batch"].tolist() == [name]
    verdict = [element.value for element in (*at.success, *at.warning) if "flagged" in element.value and "batch" in element.value]
    assert verdict and "only a large change would show" in verdict[-1]  # 12 samples: the drift check says so
    caught = int((batch.samples["is_anomaly"].astype(bool) & (batch.samples["label"] == 1)).sum())
    assert metrics(at)["Anomalies caught"] == f"{caught} of 4"  # good/ and other/ label the batch
    assert metrics(at)["AUROC"] == f"{batch.metrics.auroc:.3f}"

    at.switch_page(script(INSPECT)).run()
    assert_clean(at)
    assert at.selectbox[0].label == "Looking at" and at.selectbox[0].value == name
    assert any(f"Batch {name}" in info.value for info in at.info)
    top = batch.samples.sort_values("rank")["id"].iat[0]
    assert at.subheader[0].value == top and metrics(at)["Rank"] == f"1 of {len(batch.samples)}"
    assert at.button_group(key="inspect_queue").options == ["most anomalous first", "selection from the map"]
    assert any(caption.startswith("localization map") for caption in captions(at))
    at.button(key="verdict-anomaly").click().run()
    assert Registry().verdicts(batch.fingerprint) == {top: ("anomaly", "")}
    assert Registry().verdicts(RunResults(own_runs.images).fingerprint) == {}  # kept for the batch only

    at.switch_page(script(EMBEDDINGS)).run()
    assert_clean(at)
    figure = plotted(charts(at)[0])
    names = [trace.get("name") for trace in figure["data"]]
    assert names[0] == "training data" and len(figure["data"][0]["x"]) == 300
    assert sum(len(trace["x"]) for trace in figure["data"][1:]) == 12

    at.selectbox(key=f"view-{own_runs.images}-{name}").set_value("training data").run()
    assert_clean(at)
    assert "batch" not in at.query_params and sum(len(t["x"]) for t in plotted(charts(at)[0])["data"]) == 300


def test_a_batch_is_listed_again_after_a_restart(own_runs, runner, tmp_path):
    from app_fixtures import new_images
    from pages.components.navigation import SCORE

    at = score_server_folder(studio(SCORE, run=own_runs.images), new_images(tmp_path / "new", 5, 0), runner)
    name = at.query_params["batch"]
    clear_streamlit_caches()  # a new server process: nothing cached, no job remembered
    again = studio(SCORE, run=own_runs.images)
    assert_clean(again)
    assert frames(again)[0]["batch"].tolist() == [name]
    inspect = studio(INSPECT, run=own_runs.images, url={"batch": name})
    assert_clean(inspect)
    assert inspect.selectbox[0].value == name


def test_the_score_page_says_clearly_why_data_cannot_be_scored(own_runs, runner, tmp_path):
    from pages.components.navigation import SCORE

    (tmp_path / "empty").mkdir()
    at = score_server_folder(studio(SCORE, run=own_runs.images), tmp_path / "empty", runner)
    assert any("The scoring failed" in error.value and "is empty" in error.value for error in at.error)
    assert not at.exception
    table = tmp_path / "rows.csv"
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_csv(table, index=False)
    at = score_server_folder(at, table, runner)
    assert any("fitted on images but the data is table" in error.value for error in at.error)


def test_a_url_naming_a_batch_the_run_lacks_shows_the_training_data(shared):
    at = studio(INSPECT, run=shared.images, url={"batch": "no-such-batch"})
    assert not at.exception
    assert metrics(at)["Rank"] == "1 of 300"
    assert "batch" not in at.query_params


def test_the_score_page_runs_on_its_own(home):
    from pages.components.navigation import SCORE

    at = standalone(SCORE)
    assert not at.exception
    assert any("No run yet" in info.value for info in at.info)


def test_an_mvtec_folder_can_be_fitted_on_its_train_part_only(home, tmp_path):
    pictures = sorted((DEMO_DIR / "good").glob("*.png"))
    root = tmp_path / "bottle"
    for index, path in enumerate(pictures[:14]):
        folder = root / ("train/good" if index < 10 else "test/good" if index < 12 else "test/crack")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    at = studio()
    at.text_input(key="server_path").set_value(str(root)).run()
    at.button(key="use_server").click().run()
    assert_clean(at)
    assert metrics(at)["Samples"] == "14"
    at.toggle(key="train_part_toggle").set_value(True).run()
    assert_clean(at)
    assert at.query_params["part"] == "train"  # a reload keeps the choice
    at.switch_page(script(REFINE)).run()
    assert_clean(at)
    assert at.caption[0].value.startswith("Training data: 10 images")
