"""Results page: sharing, threshold, curves, verdicts vs model, verdict-guided re-run, comparison, downloads, runs."""
from pathlib import Path

import streamlit as st

from core.explain.attribution import DRIVES_SHARE
from core.export import archive_name, export_kept, refined_table, size_text
from core.progress import Monitor
from core.report import DEFAULT_TOP, report_html
from core.run_dir import bundle
from core.results import compare_runs, confusion_at, judged_samples, score_curves, verdict_agreement
from pages.components import charts, navigation, runs, services, state, widgets

DISAGREEMENTS_SHOWN = 20  # disagreeing samples listed with an Inspect button each (a page's bare string is shown)


def sharing_toggle(run_dir: str) -> None:
    """The switch that shares the run with the other sessions; shown only to the session that made it."""
    record = services.registry().run_at(run_dir)
    if record is None or not record.owned_by(state.session_id()):
        return
    key = f"share-{record.run_id}"
    st.toggle("Share this run with other sessions", value=record.shared, key=key, on_change=share_run,
              args=(record.run_id, key),
              help="Other sessions then list this run and can open it, its data and its verdicts. "
                   "Switch it off to make the run private to this session again.")


def share_run(run_id: str, key: str) -> None:
    """The share switch's callback: the registry records what the switch now says."""
    services.registry().share_run(run_id, st.session_state[key], session=state.session_id())


def threshold_section(run) -> None:
    scores = run.samples["anomaly_score"].to_numpy()
    threshold = widgets.threshold_control(scores, run.threshold, key="threshold")
    above = scores > threshold
    st.caption(f"{int(above.sum())} of {len(scores)} samples ({above.mean():.1%}) score above the threshold "
               f"{charts.score_text(threshold)}. "
               f"The run's own threshold ({charts.score_text(run.threshold)}) {run.threshold_meaning}. "
               f"Training data: {run.contamination_text}. {run.image_score_text}")
    st.plotly_chart(charts.score_histogram(
        scores, threshold=threshold, threshold_name="threshold", marked=above, marked_name="above the threshold",
        unmarked_name="at or below it",
        other_lines={"run's threshold": run.threshold},
        title="anomaly_score of the training samples",
    ), key="results-histogram")
    curves = score_curves(run.labels, scores) if run.labels is not None else None
    if curves is None:
        st.caption("No labels of both kinds: ROC/PR curves and the confusion matrix need them.")
        return
    metrics = run.metrics
    cells = st.columns(3)
    cells[0].metric("AUROC", f"{metrics.auroc:.3f}")
    cells[1].metric("Average precision", f"{metrics.ap:.3f}")
    cells[2].metric("F1 at the run's threshold", f"{metrics.f1:.3f}")
    roc, pr = charts.roc_and_pr(curves)
    left, right = st.columns(2)
    left.plotly_chart(roc, key="roc")
    right.plotly_chart(pr, key="pr")
    st.markdown("**Confusion at the threshold** (labels are used here only)")
    st.dataframe(confusion_at(run.labels, scores, threshold))


def verdict_section(run, verdicts: dict) -> None:
    st.subheader("Expert verdicts")
    if not verdicts:
        st.caption("No verdicts yet: record them on the Inspect page.")
        return
    judged = judged_samples(run.samples, verdicts)
    st.caption(f"{len(judged)} sample{'s' if len(judged) != 1 else ''} judged, on this run or another run of the same data: verdicts follow "
               "the samples into every run on them.")
    st.dataframe(verdict_agreement(run.samples, verdicts))
    disagreements(judged[judged["disagrees"]])
    with st.expander(f"All {len(judged)} judged sample{'s' if len(judged) != 1 else ''}"):
        st.dataframe(charts.with_score_text(judged.drop(columns="disagrees")), hide_index=True, key="judged_samples")
    st.caption("Re-running refinement with the verdicts keeps every confirmed normal, removes every confirmed "
               "anomaly before the first round (no detector trains on them), then compares the two runs.")
    if st.button("Re-run refinement using the verdicts", key="rerun_with_verdicts", type="primary"):
        dataset = runs.run_dataset(str(run.run_dir))
        job_id = runs.start_fit(dataset, run.config, {i: v for i, (v, _) in verdicts.items()},
                                    name=f"{run.source.name}-verdicts")
        state.set_job_id(job_id)
        st.session_state[state.COMPARE_WITH] = str(run.run_dir)
        navigation.switch_to(navigation.REFINE)


def disagreements(disagreeing) -> None:
    """The samples the expert and the model call differently, most anomalous first, each with a button
    that opens it on the Inspect page."""
    if disagreeing.empty:
        st.caption("The model's call agrees with every normal and anomaly verdict.")
        return
    st.markdown(f"**The expert and the model disagree on {len(disagreeing)} "
                f"sample{'s' if len(disagreeing) != 1 else ''}**")
    for row in disagreeing.head(DISAGREEMENTS_SHOWN).itertuples():
        text, button = st.columns([5, 1], vertical_alignment="center")
        text.markdown(f"`{row.id}`: expert **{row.verdict}**, model {row.model} (anomaly_score "
                      f"{charts.score_text(row.anomaly_score)}, rank {row.rank})" + (f" · {row.note}" if row.note else ""))
        if button.button("Inspect", key=f"disagree-{row.id}", icon=navigation.INSPECT.icon):
            navigation.inspect_sample(row.id)
    if len(disagreeing) > DISAGREEMENTS_SHOWN:
        st.caption(f"The {DISAGREEMENTS_SHOWN} most anomalous shown; every one is in the list of judged samples "
                   "and the scores download.")


def comparison_section(run, records) -> None:
    same_data = [r for r in records if r.status == "done" and r.fingerprint == run.info["fingerprint"]
                 and r.run_id != run.run_id and Path(r.path).is_dir()]
    if not same_data:
        return
    st.subheader("Compare with another run on the same data")
    paths = [r.path for r in same_data]
    wanted = st.session_state.get(state.COMPARE_WITH)
    default = paths.index(wanted) if wanted in paths else 0
    other = st.selectbox("Other run", paths, index=default, format_func=lambda p: Path(p).name, key="compare_run")
    comparison = compare_runs(runs.run_results(other), run)
    st.dataframe(comparison.metrics)
    st.caption(f"{len(comparison.changed)} samples changed their call.")
    if len(comparison.changed):
        st.dataframe(comparison.changed, hide_index=True)


def driving_columns(run_dir: str) -> None:
    """For a table run: which columns make the flagged rows' scores, and a warning when one column makes
    most of them (a random or id-like column should then be ignored on the Data page)."""
    shares = runs.flagged_column_shares(run_dir)
    if len(shares) < 2:
        return
    top, share = next(iter(shares.items()))
    st.caption("What makes the flagged rows' scores, by column (mean share): "
               + ", ".join(f"{column} {value:.0%}" for column, value in list(shares.items())[:5]))
    if share >= DRIVES_SHARE:
        st.warning(f"One column drives the scores: **{top}** makes {share:.0%} of the flagged rows' scores on "
                   "average. If it should not (a random code, an id, a date), set its role to ignore on the Data "
                   "page and fit again.")


def downloads(run, verdicts: dict) -> None:
    st.subheader("Downloads")
    left, right = st.columns(2)
    left.download_button("Scores and verdicts (CSV)", run.export_frame(verdicts).to_csv(index=False),
                         file_name=f"{run.run_dir.name}-scores.csv", mime="text/csv", key="download_scores",
                         on_click="ignore")
    right.download_button("Model bundle (zip)", lambda: bundle(run.run_dir), file_name=f"{run.run_dir.name}.zip",
                          mime="application/zip", key="download_bundle", on_click="ignore")
    st.caption("Score new data with the bundle: unzip it, then `refinery score RUN_DIR DATA --out scores.csv`.")
    st.download_button("Run report (HTML)", lambda: run_report(run, verdicts), file_name=f"{run.name}-report.html",
                       mime="text/html", key="download_report", on_click="ignore", icon=":material/description:",
                       help="One file for a colleague without the studio: data, settings, rounds, the score histogram, "
                       f"the {DEFAULT_TOP} most anomalous samples with their maps, verdicts and metrics. It opens "
                       "offline. Built when clicked (a few seconds). Command line: `refinery report RUN_DIR --out "
                       "report.html`.")
    refined_data_set(run, verdicts)


def refined_data_set(run, verdicts: dict) -> None:
    """The refined data set: every sample's outcome (CSV, direct), and the kept samples as a zip that a
    button builds in this session's workspace folder (with progress) before it can be downloaded."""
    table = refined_table(run, verdicts)
    what = "images" if run.kind == "images" else "rows"
    n_kept = int(table["kept"].sum())
    st.markdown(f"**Refined data set**: {n_kept} of {len(table)} {what} kept after refinement")
    left, right = st.columns(2)
    left.download_button("Every sample's outcome (CSV)", table.to_csv(index=False), file_name=f"{run.name}-refined.csv",
                         mime="text/csv", key="download_refined", on_click="ignore")
    target = services.workspace() / "exports" / state.session_id() / archive_name(run, verdicts)
    if target.is_file():
        right.download_button(f"Kept {what} (zip, {size_text(target.stat().st_size)})", lambda: target.read_bytes(),
                              file_name=f"{run.name}-kept.zip", mime="application/zip", key="download_kept",
                              on_click="ignore")
    elif right.button(f"Build a zip of the {n_kept} kept {what}", key="build_kept"):
        bar = right.progress(0.0, text="copying the kept samples")
        export_kept(run.run_dir, target, verdicts=verdicts, monitor=Monitor(
            lambda event: bar.progress(event.done / max(event.total, 1), text=f"{event.done} of {event.total} files")))
        st.rerun()
    st.caption("The CSV: id, anomaly_score, is_anomaly, label (when known), kept (1/0 after the last round), "
               "round_removed (0 = kept), votes (detectors that called it anomalous in that round) and your verdict. "
               "The zip holds it as refined.csv, with "
               + ("the kept image files at their paths in the data folder, so class folders survive."
                  if run.kind == "images" else "the kept rows of the table, every column included.")
               + " Command line: `refinery export RUN_DIR --kept --out PATH` (a folder or a .zip).")


def run_report(run, verdicts: dict) -> bytes:
    """The run report, built when its download is clicked (in the download's request: the button shows
    a spinner meanwhile, and no ``st.*`` call would show there); the run's cached model draws the maps."""
    run_dir = str(run.run_dir)
    return report_html(run_dir, verdicts=verdicts, model=runs.run_model(run_dir),
                       workspace=services.workspace()).encode("utf-8")


def past_runs(records, current: str | None) -> None:
    """The runs this session may see, and a choice to open one instead of ``current`` (the active run's folder)."""
    st.subheader("Runs")
    st.dataframe(runs.runs_table(records), hide_index=True)
    openable = [r.path for r in records if r.status == "done" and Path(r.path).is_dir()]
    chosen = st.selectbox("Open a run", openable, format_func=lambda p: Path(p).name, key="open_run",
                          index=openable.index(current) if current in openable else 0)
    if chosen != current and st.button("Open", key="open_run_button"):
        state.set_run_dir(chosen)
        st.rerun()


def body() -> None:
    st.title("Results")
    run_dir = widgets.require_run()
    records = services.visible_runs()
    if run_dir is not None:
        run = runs.run_results(run_dir)
        verdicts = services.registry().verdicts(run.fingerprint, visible_to=state.session_id())
        st.caption(f"Run {run.name} (id {run.run_id}): {len(run.samples)} {'images' if run.kind == 'images' else 'rows'}, "
                   f"detector {run.config.detector}, "
                   f"{len(run.rounds)} refinement rounds" + (f" by {run.config.refine_detector} ensembles" if run.rounds else ""))
        sharing_toggle(run_dir)
        threshold_section(run)
        verdict_section(run, verdicts)
        comparison_section(run, records)
        if run.kind == "table" and run.config.objective == "none":  # explanations need the table's own features
            driving_columns(run_dir)
        downloads(run, verdicts)
    if records:  # without an active run (none yet, or another session's in the URL) one can be opened here
        past_runs(records, run_dir)


widgets.guarded(body)
