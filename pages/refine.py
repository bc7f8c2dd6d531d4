"""Refine page: choose the method, start a fit in the background, watch rounds remove suspects live.

While a job runs, its live view sits at the top and the settings fold away below it."""
import streamlit as st

from core import engine
from core.config import OBJECTIVES, TABLE_OBJECTIVES, parse_gamma
from core.data.columns import ColumnChoice
from pages.components import fit_fields, navigation, runs, services, state, widgets
from pages.components.rounds import show_rounds


def method_form(dataset, columns: ColumnChoice, job_running: bool):
    """The fit settings; returns a FitConfig (with the table's column roles ``columns``) when Start was
    pressed, else None. Each widget's label, help, choices and range are its field's (``fit_fields``)."""
    suggested = engine.suggested_config(dataset)
    images = dataset.kind == "images"
    objective = st.selectbox(  # outside the form, so that the fields it needs show or hide at once
        **fit_fields.choice("objective", suggested.objective, OBJECTIVES if images else TABLE_OBJECTIVES))
    with st.form("fit_form", enter_to_submit=False):  # Enter in a field must not start a long fit
        left, middle, right = st.columns(3)
        detector = left.selectbox(**fit_fields.choice("detector", suggested.detector))
        refine_detector = left.selectbox(**fit_fields.choice("refine_detector", suggested.refine_detector))
        refine = left.toggle(**fit_fields.switch("refine", suggested.refine))
        ensemble = middle.number_input(**fit_fields.number("ensemble", suggested.ensemble))
        gamma = middle.text_input(**fit_fields.text("gamma", suggested.gamma))
        rounds = middle.number_input(**fit_fields.number("rounds", suggested.rounds))
        threshold_source = right.selectbox(**fit_fields.choice("threshold_source", suggested.threshold_source))
        seed = right.number_input(**fit_fields.number("seed", suggested.seed))
        device = right.selectbox(**fit_fields.choice("device", suggested.device))
        backbone, image_size, localization = suggested.backbone, suggested.image_size, suggested.localization
        weights, image_score = suggested.weights or "", suggested.image_score
        if images:
            backbone = left.selectbox(**fit_fields.choice("backbone", suggested.backbone))
            weights = left.text_input(**fit_fields.text("weights", weights))
            image_size = int(middle.select_slider(**fit_fields.steps("image_size", suggested.image_size)))
            localization = right.selectbox(**fit_fields.choice("localization", suggested.localization))
            image_score = middle.selectbox(**fit_fields.choice("image_score", suggested.image_score))
        encoder, epochs, retrain_epochs = suggested.encoder, suggested.epochs, suggested.retrain_epochs
        if objective != "none":
            st.markdown(f"**Representation: {objective}**")
            left, middle, right = st.columns(3)
            encoder = left.selectbox(**fit_fields.choice("encoder", suggested.encoder))
            epochs = middle.number_input(**fit_fields.number("epochs", suggested.epochs))
            retrain_epochs = right.number_input(**fit_fields.number("retrain_epochs", suggested.retrain_epochs))
        label = "Start refinement" if not job_running else "A job is running; start another when it is done"
        if not st.form_submit_button(label, type="primary", disabled=job_running):
            return None
    return suggested.with_changes(
        detector=detector, refine_detector=refine_detector, refine=refine, ensemble=int(ensemble), gamma=parse_gamma(gamma), rounds=int(rounds),
        threshold_source=threshold_source, seed=int(seed), device=device, backbone=backbone,
        weights=weights.strip() or None, image_size=image_size, localization=localization, image_score=image_score, objective=objective,
        encoder=encoder, epochs=int(epochs), retrain_epochs=int(retrain_epochs),
        label_column=columns.label_column, id_column=columns.id_column, ignore_columns=columns.ignore_columns,
    )


def live_view(job_id: str) -> None:
    """The running job: its progress, redrawn every ``LIVE_REFRESH_S``, and the rounds it has finished, drawn
    again only when the job publishes another (a published round never changes; redrawing its charts and
    thumbnails every second took the GIL from the fit itself)."""
    status = services.job_runner().status(job_id)
    if status is None:
        return
    dataset, rounds = status.outputs.get("dataset"), status.outputs.get("rounds", ())
    live_progress(job_id, drawn=_published(status))
    if dataset is not None:
        paths = dict(zip(dataset.ids, map(str, dataset.paths or [])))
        show_rounds(rounds, ids=dataset.ids, labels=dataset.labels, image_path=paths.get if dataset.paths else None,
                    key="live", inspectable=False, values=dataset.table)


@st.fragment(run_every=services.LIVE_REFRESH_S)
def live_progress(job_id: str, drawn: tuple[bool, int]) -> None:
    """Progress and Cancel. ``drawn`` is what the page below shows: (the job's data, its number of rounds);
    the whole page reruns once the job has published more, or has ended (the finished view)."""
    status = services.job_runner().status(job_id)
    if status is None:
        return
    if not status.active or _published(status) != drawn:
        st.rerun()
    widgets.job_progress(status)
    widgets.cancel_button(job_id, key="cancel_job")


def _published(status) -> tuple[bool, int]:
    """What a fit job has published so far: (its data set, its number of finished rounds)."""
    return status.outputs.get("dataset") is not None, len(status.outputs.get("rounds", ()))


def finished_view(status) -> None:
    if status.state == "done":
        state.adopt_job_result(status.job_id, status.result.run_dir)
        metrics = status.result.metrics
        summary = f"; training AUROC {metrics.auroc:.3f} from the labels" if metrics else ""
        st.success(f"Finished in {status.elapsed_s:.0f} s: run {status.result.run_dir.name} saved{summary}.")
    elif status.state == "cancelled":
        st.warning("The job was cancelled; nothing was saved.")
    else:
        st.error(f"The job failed: {status.message}")


def saved_rounds(run_dir: str) -> None:
    run = runs.run_results(run_dir)
    st.subheader(f"Run {run.name}")
    st.caption(f"{len(run.samples)} samples, {int(run.samples['kept'].sum())} kept; {run.contamination_text}. "
               f"The threshold {run.threshold_meaning}. Run id {run.run_id}.")
    image_path = (lambda sample_id: str(run.image_path(sample_id))) if run.kind == "images" else None
    show_rounds(run.rounds, ids=list(run.samples["id"]), labels=run.labels, image_path=image_path, key="saved",
                anomaly_score=run.samples["anomaly_score"].to_numpy(), values=runs.run_values(run_dir, run.kind))
    cells = st.columns(3)
    navigation.link(navigation.EMBEDDINGS, "Explore the map", where=cells[0])
    navigation.link(navigation.INSPECT, "Inspect samples", where=cells[1])
    navigation.link(navigation.RESULTS, "Results and export", where=cells[2])


def training_caption(dataset, path: str, protocol, status) -> str:
    """What the page fits: the running job's data once it has started, else the active data."""
    fitting = status.outputs.get("dataset") if status is not None and status.active else None
    if fitting is not None:
        return f"Fitting: {_samples(fitting)} from {fitting.source} ({status.title})"
    return f"Training data: {_samples(dataset)} from {path}" + (" (contamination protocol applied)" if protocol else "")


def _samples(dataset) -> str:
    """``300 images``, or ``200 rows of 3 feature columns``."""
    if dataset.kind == "images":
        return f"{len(dataset)} images"
    return f"{len(dataset)} rows of {dataset.table.shape[1]} feature columns"


def body() -> None:
    st.title("Refine")
    path, columns, protocol = services.active_data()
    dataset = services.training_dataset(path, columns, protocol)
    status = services.watched_job()  # this session's own job only
    running = status is not None and status.active
    st.caption(training_caption(dataset, path, protocol, status))
    if services.job_refused():
        st.warning(services.FOREIGN_JOB)
    widgets.column_problems(dataset)
    if running:
        live_view(status.job_id)
    with st.expander("Settings of the next fit" if running else "Fit settings", expanded=not running):
        config = method_form(dataset, columns, job_running=running)
    if config is not None:
        state.set_job_id(runs.start_fit(dataset, config))
        st.rerun()
    if running:
        return
    if status is not None:
        finished_view(status)
    if services.run_refused():
        st.warning(services.FOREIGN_RUN)
    elif services.active_run_dir():
        saved_rounds(services.active_run_dir())


widgets.guarded(body)
