"""Inspect page: one sample at a time with its maps, neighbours and the expert's verdict."""

import re

import numpy as np
import streamlit as st

from core.errors import DataError
from core.data.columns import cell_text
from core.explain import render
from core.review import call_precision, review_order, review_progress
from pages.components import charts, runs, services, state, widgets

REVIEW_QUEUE = "review next (most informative first)"
QUEUES = ("most anomalous first", "selection from the map", "removed during refinement", REVIEW_QUEUE)
BATCH_QUEUES = QUEUES[:2]  # the lists that apply to a batch of new data
QUEUE_NAMES = dict(zip(QUEUES, ("ranked", "selection", "removed", "review")))  # how the URL names a list (?list=)
LIST_PARAM, SAMPLE_PARAM = "list", "sample"  # the URL keeps the list and the sample shown, for a reload
URL_READ = "inspect_url_read"  # session key: the URL's list and sample were taken (once, on a reload)
SCALES = ("per run", "per image")
SCALE_HELP = ("Colour starts at the normal floor: the 99th percentile of the map values of normal (kept) "
              "images; below it the image shows through. Per run: red means the same value on every image "
              "(the 99th percentile of the run's most anomalous images), so images compare. Per image: red "
              "at this image's own peak.")
MAP_UNITS = "feature distance"
GRADCAM_UNITS = "Grad-CAM, score units"
MAP_SHOWN_PX = 256  # the least height a map is drawn at, with its colour bar (see shown_map)
VERDICTS = (("normal", "N", ":material/check_circle:"), ("anomaly", "A", ":material/error:"),
            ("unsure", "U", ":material/help:"))
GO_TO_ID = "go_to_id"  # the id box's key
CHART_FEATURES = 10    # features in a row's chart; its table lists every one


def queue_order(run, queue: str) -> np.ndarray:
    by_score = np.argsort(-run.samples["anomaly_score"].to_numpy(), kind="stable")
    if queue == "selection from the map":
        chosen = set(state.selection())
        return np.array([i for i in by_score if i in chosen], dtype=np.int64)
    if queue == "removed during refinement":
        return by_score[run.samples["kept"].to_numpy()[by_score] == 0]
    if queue == REVIEW_QUEUE:  # a sample leaves it once judged, so the next unjudged one comes up in its place
        return review_order(run.samples, run.rounds, run.threshold, verdicts(run).keys())
    return by_score


def verdicts(run) -> dict[str, tuple[str, str]]:
    """The verdicts this session sees on the run's data: id -> (verdict, note)."""
    return services.registry().verdicts(run.fingerprint, visible_to=state.session_id())


def review_status(run) -> None:
    """How far the review has got and, once verdicts exist, how often the model's anomaly calls were right."""
    judged = verdicts(run)
    st.caption(review_progress(run.samples, run.rounds, run.threshold, judged.keys()).text)
    precision = call_precision(run.samples, judged)
    if precision is not None:
        st.caption(precision.text)


def pager(order: np.ndarray, what: str = "") -> int:
    """Previous/next buttons (keys Left/Right); returns the sample index shown. ``what`` names the
    samples counted ("unjudged")."""
    position = min(st.session_state.get(state.INSPECT_POSITION, 0), len(order) - 1)
    previous, box, following = st.columns([1, 2, 1])
    if previous.button("Previous", key="previous", shortcut="Left", icon=":material/chevron_left:", disabled=position == 0):
        position -= 1
    if following.button("Next", key="next", shortcut="Right", icon=":material/chevron_right:",
                        disabled=position >= len(order) - 1):
        position += 1
    st.session_state[state.INSPECT_POSITION] = position
    box.caption(f"{position + 1} of {len(order)} {what}  ·  keys: Left / Right to page, N / A / U for a verdict")
    return int(order[position])


def go_to_typed_id() -> None:
    """The id box's callback: open the typed id (see :func:`state.open_in_inspect`) and empty the box."""
    typed = st.session_state[GO_TO_ID].strip()
    if typed:
        state.open_in_inspect(typed)
    st.session_state[GO_TO_ID] = ""


def open_requested(run, sample_id: str) -> None:
    """Show ``sample_id`` next, at its place in the full ranked list; a message when the run lacks it."""
    try:
        index = run.index_of(sample_id)
    except DataError as error:
        st.warning(f"{error}; its ids look like {run.samples['id'].iat[0]}")
        return
    st.session_state[state.INSPECT_QUEUE] = QUEUES[0]
    st.session_state[state.INSPECT_POSITION] = int(run.samples["rank"].iat[index]) - 1


def facts(run, index: int) -> None:
    row = run.samples.iloc[index]
    cells = st.columns(5)
    cells[0].metric("anomaly_score", charts.score_text(row['anomaly_score']), help="Higher = more anomalous")
    cells[1].metric("Rank", f"{row['rank']} of {len(run.samples)}")
    cells[2].metric("Model says", "anomaly" if row["is_anomaly"] else "normal", help=f"Threshold {charts.score_text(run.threshold)}")
    if "round_removed" in row:
        cells[3].metric("Removed in round", row["round_removed"] or "- (kept)")
    else:  # a batch of new data: scored with the run, not refined; named without its time of scoring and tag
        short = re.sub(r"^\d{8}-\d{6}-|-[0-9a-f]{6}$", "", run.name)
        cells[3].metric("Batch", short[:19] + "…" if len(short) > 20 else short, help=run.name)
    cells[4].metric("Label", {1: "anomaly", 0: "normal"}.get(row.get("label", -1), "unknown"))


@st.cache_data(max_entries=8, show_spinner="Measuring the run's colour scale for maps...")
def localization_scale(run_dir: str) -> render.ColourScale:
    """The run's colour scale for localization maps: the localizer's stored floor, the top from its worst images."""
    run = runs.run_results(run_dir)
    _, top = render.scale_images(run.samples["anomaly_score"].to_numpy(), run.samples["kept"].to_numpy())
    fitted = runs.run_model(run_dir)
    maps = fitted.localizer.iter_anomaly_maps([run.image_path(run.samples["id"].iat[i]) for i in top])
    return render.run_scale(fitted.localizer.display_scale_, maps, MAP_UNITS)


@st.cache_data(max_entries=8, show_spinner="Measuring the run's colour scale for Grad-CAM...")
def gradcam_scale(run_dir: str) -> render.ColourScale:
    """The run's colour scale for Grad-CAM: floor from kept images, top from the worst images."""
    run = runs.run_results(run_dir)
    normal, top = render.scale_images(run.samples["anomaly_score"].to_numpy(), run.samples["kept"].to_numpy(),
                                      seed=run.config.seed)
    ids = run.samples["id"]
    floor = render.normal_floor(runs.gradcam_map(run_dir, str(run.image_path(ids.iat[i]))) for i in normal)
    return render.run_scale(floor, (runs.gradcam_map(run_dir, str(run.image_path(ids.iat[i]))) for i in top),
                            GRADCAM_UNITS)


def shown_map(path: str, amap: np.ndarray, run_scale: render.ColourScale, per_image: bool,
              mask_path: str | None) -> np.ndarray:
    """The image with ``amap`` drawn over it on the chosen scale, the mask outlined, the colour bar beside it.

    A small image (a 28 px Fashion-MNIST one) is drawn enlarged, each pixel a square block, to at least
    ``MAP_SHOWN_PX`` tall: the colour bar is as tall as the image, and its labels need the room.
    """
    scale = render.image_scale(run_scale, amap) if per_image else run_scale
    image = services.image(path)
    blocks = -(-MAP_SHOWN_PX // image.shape[0])  # ceiling division: 1 for an image this tall or taller
    shown = render.heatmap(_enlarged(image, blocks), _enlarged(amap, blocks), scale)
    if mask_path is not None:
        shown = render.mask_contour(shown, _enlarged(services.image(mask_path)[..., 0] > 127, blocks))
    return render.with_colour_bar(shown, scale)


def _enlarged(array: np.ndarray, blocks: int) -> np.ndarray:
    """``array`` (an image or a map, height and width first) with each pixel repeated ``blocks`` times each way."""
    return np.repeat(np.repeat(array, blocks, axis=0), blocks, axis=1)


def image_views(run_dir: str, run, sample_id: str) -> None:
    path = str(run.image_path(sample_id))
    mask_path = runs.viewed_mask(run_dir, run, sample_id)
    scale_choice = st.segmented_control("Colour scale", SCALES, default=SCALES[0], key="heatmap_scale",
                                        help=SCALE_HELP)
    per_image = scale_choice == "per image"
    outline = " · green: ground-truth mask" if mask_path else ""
    columns = st.columns(3)
    columns[0].image(services.image(path), caption="image", width="stretch")
    if run.config.localization != "none":
        amap = runs.viewed_map(run_dir, run, sample_id, path)  # a batch's saved map, or computed
        columns[1].image(shown_map(path, amap, localization_scale(run_dir), per_image, mask_path),
                         width="stretch", caption=f"localization map ({scale_choice or SCALES[0]} scale){outline}")
    with columns[2]:
        if st.toggle("Grad-CAM of the anomaly score", key="show_gradcam"):
            st.image(shown_map(path, runs.gradcam_map(run_dir, path), gradcam_scale(run_dir), per_image, mask_path),
                     caption=f"Grad-CAM ({scale_choice or SCALES[0]} scale){outline}", width="stretch")


def neighbours(run, index: int, training) -> None:
    """The kept training samples nearest to sample ``index`` of ``run`` (the training data or a batch)."""
    near = run.nearest_kept(index)
    st.markdown("**Nearest kept training samples** (embedding distance)")
    if run.kind == "images":
        widgets.gallery([services.thumbnail(str(training.image_path(i))) for i in near["id"]],
                        [f"{i} · {d:.3g}" for i, d in zip(near["id"], near["distance"])], columns=6)
    else:
        shown = charts.with_score_text(near.drop(columns="index"))
        st.dataframe(shown.assign(distance=near["distance"].map("{:.3g}".format)), hide_index=True)


def table_views(run_dir: str, run, sample_id: str) -> None:
    """The row's features, largest share of its anomaly score first: the leading ones as a chart, then
    every feature of the row beside the kept rows' typical range."""
    fitted = runs.run_model(run_dir)
    [explanation] = fitted.explain_rows(runs.viewed_dataset(run_dir, run), [sample_id],
                                        k=len(fitted.encoder.feature_names))
    features = explanation.features
    leading = features[:CHART_FEATURES]
    st.plotly_chart(charts.feature_bars([f.feature for f in leading], [f.share for f in leading]))
    st.markdown("**The whole row** against the kept rows")
    st.dataframe([{"feature": f.feature, "value": cell_text(f.value),
                   "against the kept rows (typical: 5-95%)": f.describe(),
                   "share of score": f"{f.share:.0%}"} for f in features], hide_index=True)


def verdict_form(run, sample_id: str) -> None:
    """The expert's verdict on the sample, recorded on the run's data: every run on the same data shows it."""
    current = services.registry().verdicts(run.fingerprint, visible_to=state.session_id()).get(sample_id)
    st.markdown("**Your verdict**" + (f": {current[0]}" + (f" ({current[1]})" if current[1] else "") if current else ""))
    note_key = f"note-{sample_id}"
    st.text_input("Note (optional)", key=note_key, value=current[1] if current else "")
    for column, (verdict, key, icon) in zip(st.columns(3), VERDICTS):
        column.button(verdict.capitalize(), key=f"verdict-{verdict}", shortcut=key, icon=icon, width="stretch",
                      on_click=record_verdict, args=(run.fingerprint, run.run_id, sample_id, verdict, note_key))


def record_verdict(fingerprint: str, run_id: str, sample_id: str, verdict: str, note_key: str) -> None:
    """A verdict button's callback: it runs before the page, which then shows the stored verdict.

    A callback rather than ``st.toast`` + ``st.rerun`` in the page: Streamlit drops a toast
    followed at once by a rerun (streamlit#7740, still timing-dependent in 1.67).
    """
    services.registry().set_verdict(fingerprint, sample_id, verdict, st.session_state.get(note_key, ""),
                                    run_id=run_id, session=state.session_id())
    st.toast(f"{sample_id}: {verdict}")


def url_request(queues) -> str | None:
    """On a reload (a new browser session), the list and the sample the URL names (``?list=...&sample=...``):
    the list is chosen here, the sample's id returned to be found in it. None otherwise."""
    if st.session_state.get(URL_READ):
        return None
    st.session_state[URL_READ] = True
    by_name = {name: queue for queue, name in QUEUE_NAMES.items() if queue in queues}
    queue = by_name.get(st.query_params.get(LIST_PARAM))
    if queue is not None:
        st.session_state[state.INSPECT_QUEUE] = queue
    return st.query_params.get(SAMPLE_PARAM)


def body() -> None:
    st.title("Inspect")
    run_dir = widgets.require_run()
    if run_dir is None:
        return
    training = runs.run_results(run_dir)
    run = runs.viewed(run_dir)  # the training data, or a batch of new data scored with the run
    st.text_input("Go to id", key=GO_TO_ID, on_change=go_to_typed_id,
                  placeholder=f"e.g. {run.samples['id'].iat[0]}; Enter opens it")
    requested = st.session_state.pop(state.INSPECT_ID, None)
    if requested is not None:  # typed, or opened from another page
        open_requested(run, requested)
    queues = QUEUES if run is training else BATCH_QUEUES  # a batch was scored, not refined
    if requested is not None:
        st.session_state[URL_READ] = True  # a sample opened from another page wins over the URL's
    from_url = url_request(queues)
    if st.session_state.get(state.INSPECT_QUEUE) not in queues:
        st.session_state[state.INSPECT_QUEUE] = queues[0]
    # Buttons, not radio buttons: the keys N / A / U and Left / Right do nothing while a radio button has
    # the focus (Streamlit ignores shortcuts typed into an input), i.e. right after a list was chosen.
    queue = st.segmented_control("Browse", queues, key=state.INSPECT_QUEUE, required=True)
    order = queue_order(run, queue)
    if from_url is not None:
        found = np.flatnonzero(run.samples["id"].to_numpy()[order] == from_url)
        if len(found):
            st.session_state[state.INSPECT_POSITION] = int(found[0])
    if queue == REVIEW_QUEUE:
        review_status(run)
    if len(order) == 0:
        st.info("This list is empty: select points on the Embeddings page, or browse another list.")
        return
    index = pager(order, "unjudged" if queue == REVIEW_QUEUE else "")
    sample_id = run.samples["id"].iat[index]
    st.query_params[LIST_PARAM] = QUEUE_NAMES[queue]
    st.query_params[SAMPLE_PARAM] = str(sample_id)
    st.subheader(sample_id)
    facts(run, index)
    if run.kind == "images":
        image_views(run_dir, run, sample_id)
    else:
        table_views(run_dir, run, sample_id)
    verdict_form(run, sample_id)
    neighbours(run, index, training)


widgets.guarded(body)
