"""Score page: score new data with a run in the background (as ``refinery score`` does), list the run's
batches, check a batch for drift, and open it on Inspect and Embeddings."""
from pathlib import Path

import numpy as np
import streamlit as st

from core.batches import batches_table, test_part_of
from core.data.parts import TEST_PART
from pages.components import charts, navigation, runs, services, sources, state, widgets

def run_choice() -> str | None:
    """The run to score with: the active run, or another one this session may see (it becomes active)."""
    active = widgets.require_run()
    if active is None:
        return None
    paths = [run.path for run in services.visible_runs() if run.status == "done" and Path(run.path).is_dir()]
    if active not in paths:
        paths.insert(0, active)
    names = [Path(path).name for path in paths]  # a run's folder name, its path where two share a name
    chosen = st.selectbox("Run", paths, index=paths.index(active),
                          format_func=lambda path: Path(path).name if names.count(Path(path).name) == 1 else path,
                          key=f"score_run-{active}", help="The run whose model scores the new data.")
    if chosen != active:
        state.set_run_dir(chosen)
        st.rerun()
    return chosen


def start(run_dir: str, data: Path, part: str | None = None) -> None:
    job_id = runs.start_score(run_dir, data, part=part, name=st.session_state.get("batch_name", "").strip())
    st.session_state[state.SCORE_JOB] = job_id
    state.set_job_id(job_id)
    st.rerun()


def new_batch(run_dir: str) -> None:
    st.subheader("Score new data")
    st.text_input("Batch name (optional)", key="batch_name", max_chars=40,
                  help="Names the batch's folder with the time of scoring; by default the data's name.")
    test_root = test_part_of(run_dir)
    if test_root is not None:
        st.markdown(f"This run was fitted on the **train/** part of **{test_root.name}**; its **test/** part is "
                    "new data for it.")
        if st.button(f"Score {test_root.name}/test", key="score_test_part", type="primary"):
            start(run_dir, test_root, TEST_PART)
    chosen = sources.pick_source("Score", prefix="score_")
    if chosen is not None:
        start(run_dir, chosen[0])


@st.fragment(run_every=services.LIVE_REFRESH_S)
def live_view(job_id: str) -> None:
    status = services.job_runner().status(job_id)
    if status is None:
        return
    if not status.active:
        st.rerun()  # the whole page shows how it ended
    widgets.job_progress(status)
    widgets.cancel_button(job_id, key="cancel_score")


def finished(status, run_dir: str) -> None:
    """How this session's last scoring job ended; a new batch becomes the one the other pages show."""
    if status.state == "done":
        batch = status.result
        if st.session_state.get(state.SHOWN_BATCH) != status.job_id and str(batch.run_dir) == run_dir:
            st.session_state[state.SHOWN_BATCH] = status.job_id
            state.set_viewed_batch(batch.name)
        st.success(f"Scored {len(batch.samples)} samples in {status.elapsed_s:.0f} s: "
                   f"{int(batch.samples['is_anomaly'].sum())} flagged. Saved as batch {batch.name}.")
    elif status.state == "cancelled":
        st.warning("The scoring was cancelled; no batch was saved.")
    else:
        st.error(f"The scoring failed: {status.message}")


def drift_view(run_dir: str, name: str) -> None:
    check = runs.drift(run_dir, name)
    (st.warning if check.drifted else st.success)(check.verdict)
    cells = st.columns(3)
    cells[0].metric("Flagged", f"{check.share:.1%}", help=f"{check.flagged} of {check.n} above the run's threshold; "
                    f"95% interval {check.interval[0]:.1%} to {check.interval[1]:.1%}")
    cells[1].metric("Expected of normal data", f"{check.false_alarm_rate:.1%}",
                    help="The run's stated false-alarm rate: the share of normal data its threshold flags.")
    cells[2].metric("Scores higher than training?", f"{'yes' if check.scores_higher else 'no'} (p = {check.p_scores:.2g})",
                    help=f"One-sided two-sample Kolmogorov-Smirnov test against the out-of-sample scores of the "
                         f"{check.n_reference} kept training samples (small p: higher).")
    batch = runs.batch_results(run_dir, name)
    scores = batch.samples["anomaly_score"].to_numpy()
    st.plotly_chart(charts.score_histogram(
        scores, threshold=batch.threshold, threshold_name="run's threshold", marked=scores > batch.threshold,
        marked_name="flagged", unmarked_name="not flagged",
        other_lines={"kept training samples: median": float(np.median(runs.reference_scores(run_dir)))},
        title=f"anomaly_score of batch {name}"), key="batch-histogram")
    labelled(batch)


def labelled(batch) -> None:
    """How the run's calls on the batch compare with its labels (MVTec test/ folders, good/ folders), when it has both kinds."""
    metrics = batch.metrics
    if metrics is None:
        return
    labels, called = batch.labels, batch.samples["is_anomaly"].to_numpy().astype(bool)
    caught = int(np.sum(called & (labels == 1)))
    false_alarms = int(np.sum(called & (labels == 0)))
    st.markdown(f"**Against the batch's labels** ({metrics.n_normal} labelled normal, {metrics.n_anomalous} "
                "labelled anomalous; labels are used here only)")
    cells = st.columns(4)
    cells[0].metric("Anomalies caught", f"{caught} of {metrics.n_anomalous}",
                    help="Labelled anomalous samples that the run's threshold flags (recall).")
    cells[1].metric("False alarms", f"{false_alarms} of {metrics.n_normal}",
                    help="Labelled normal samples that the run's threshold flags.")
    cells[2].metric("AUROC", f"{metrics.auroc:.3f}",
                    help="How well the scores rank anomalous above normal samples, whatever the threshold (1 = perfectly, 0.5 = chance).")
    cells[3].metric("F1 at the run's threshold", f"{metrics.f1:.3f}", help=f"Average precision {metrics.ap:.3f}.")


def saved_batches(run_dir: str) -> None:
    table = batches_table(run_dir)
    st.subheader("Batches of this run")
    if table.empty:
        st.caption("None yet: score new data above.")
        return
    st.dataframe(table, hide_index=True)
    names = list(table["batch"])
    current = state.viewed_batch()
    chosen = st.selectbox("Batch", names, index=names.index(current) if current in names else 0,
                          key=f"score_batch-{current}", help="Opened on Inspect and Embeddings too.")
    if chosen != current:
        state.set_viewed_batch(chosen)
    drift_view(run_dir, chosen)
    cells = st.columns(2)
    navigation.link(navigation.INSPECT, "Inspect this batch", where=cells[0])
    navigation.link(navigation.EMBEDDINGS, "This batch on the run's map", where=cells[1])


def body() -> None:
    st.title("Score")
    run_dir = run_choice()
    if run_dir is None:
        return
    status = services.watched_job()
    own = status if status is not None and status.job_id == st.session_state.get(state.SCORE_JOB) else None
    if own is not None and own.active:
        live_view(own.job_id)
    else:
        if own is not None:
            finished(own, run_dir)
        widgets.guarded(lambda: new_batch(run_dir))  # a refused choice shows its message; the batches stay below
    saved_batches(run_dir)


widgets.guarded(body)
