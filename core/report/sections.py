"""The run report's sections, each a function of the saved run (:class:`core.results.RunResults`) to HTML.

Images and maps come from the run's models (:class:`core.run_model.RunModel`) and are drawn on the
run's colour scale (:mod:`core.explain.render`), as the studio's Inspect page draws them.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from core.config import FIT_PARAMS
from core.data.decode import open_image
from core.errors import DataError, RefineryError
from core.explain import render
from core.progress import Monitor
from core.report.markup import Html, curve_svg, histogram_svg, img, join, number, table, tag, thumbnail_pair
from core.results import RunResults, confusion_at, judged_samples, score_curves, score_text, verdict_agreement

MAP_UNITS = "feature distance"
SCALE_TEXT = ("Colour starts at the normal floor (the 99th percentile of the map values of normal, kept images): "
              "below it the image shows through. Red means the same value on every image: the 99th percentile "
              "of the run's most anomalous images.")
FEATURES = 5
"""Features listed per table row among the most anomalous samples."""
SKIPPED_SHOWN = 50
LABELS = {1: "anomaly", 0: "normal"}


def section(anchor: str, title: str, content: list) -> Html:
    return tag("section", [tag("h2", title)] + content, id=anchor)


def facts(pairs: list[tuple[str, object]]) -> Html:
    """A two-column table of named facts."""
    return table(["", ""], [(tag("strong", name), value) for name, value in pairs], class_="facts")


def data_section(run: RunResults) -> Html:
    samples = run.samples
    kept = int(samples["kept"].sum())
    labels = run.labels
    known = [] if labels is None else [("labelled normal", int(np.sum(labels == 0))),
                                       ("labelled anomaly", int(np.sum(labels == 1)))]
    skipped = run.info.get("skipped") or []
    content = [facts([
        ("source", run.info["data_source"]), ("kind", "images" if run.kind == "images" else "table rows"),
        ("samples", len(samples)), ("kept after refinement", kept), ("removed by refinement", len(samples) - kept),
        ("called anomalous at the threshold", int(samples["is_anomaly"].sum())), *known,
        ("skipped files", len(skipped)), ("data fingerprint", run.fingerprint),
    ])]
    if labels is not None:
        content.append(tag("p", "Labels are used for the metrics and this report only; nothing was trained on them."))
    if skipped:
        shown = skipped[:SKIPPED_SHOWN]
        more = f"; {len(skipped) - len(shown)} more not listed" if len(skipped) > len(shown) else ""
        content.append(table(["skipped file", "why"], [(item["name"], item["reason"]) for item in shown],
                             caption=f"Files the loader could not use{more}"))
    return section("data", "Data", content)


def settings_section(run: RunResults) -> Html:
    rows = []
    for field in fields(run.config):
        value = getattr(run.config, field.name)
        shown = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else ("-" if value is None else value)
        spec = FIT_PARAMS.get(field.name)
        rows.append((field.name, shown, spec.help if spec else ""))
    return section("settings", "Settings", [table(["setting", "value", "what it does"], rows, class_="settings")])


def rounds_section(run: RunResults) -> Html:
    samples = run.samples
    summary = tag("p", f"{len(samples)} samples before refinement; {int(samples['kept'].sum())} kept and "
                       f"{int((samples['kept'] == 0).sum())} removed at the end. Training data: "
                       f"{run.contamination_text}.")
    if not run.rounds:
        return section("rounds", "Refinement rounds", [summary, tag(
            "p", "No refinement round ran: the final detector was fitted on every sample.")])
    labelled = any(record.precision is not None for record in run.rounds)
    header = ["round", "removed", "came back", "kept after", "contamination estimate", "90% interval"]
    header += ["removal precision", "removal recall"] if labelled else []
    rows = []
    for record in run.rounds:
        interval = record.gamma_interval
        row = [record.round, len(record.removed), len(record.returned), int(record.kept.sum()), f"{record.gamma:.1%}",
               f"{interval[0]:.1%} to {interval[1]:.1%}" if interval else "- (given)"]
        rows.append(row + ([number(record.precision, 3), number(record.recall, 3)] if labelled else []))
    notes = tag("ul", [tag("li", record.note) for record in run.rounds])
    return section("rounds", "Refinement rounds", [summary, table(header, rows), tag("h3", "Notes"), notes])


def scores_section(run: RunResults) -> Html:
    scores = run.samples["anomaly_score"].to_numpy()
    above = int(np.sum(scores > run.threshold))
    text = (f"{above} of {len(scores)} samples ({above / max(1, len(scores)):.1%}) score above the threshold "
            f"{score_text(run.threshold)} (red). The threshold {run.threshold_meaning}.")
    return section("scores", "Scores and threshold", [tag("p", text), histogram_svg(scores, run.threshold)])


def sample_calls(run: RunResults, index: int, verdicts: dict) -> list[tuple[str, str]]:
    """What the run and the expert say of sample ``index``: named short texts."""
    row = run.samples.iloc[index]
    calls = [("rank", f"{row['rank']} of {len(run.samples)}"), ("anomaly_score", score_text(row["anomaly_score"])),
             ("model", "anomaly" if row["is_anomaly"] else "normal"),
             ("refinement", f"removed in round {row['round_removed']}" if row["round_removed"] else "kept")]
    if "label" in row and row["label"] >= 0:
        calls.append(("label", LABELS[int(row["label"])]))
    if row["id"] in verdicts:
        verdict, note = verdicts[row["id"]]
        calls.append(("verdict", verdict + (f" ({note})" if note else "")))
    return calls


def image_samples(run: RunResults, model, order: np.ndarray, verdicts: dict, monitor: Monitor) -> list:
    """Cards of the images at ``order`` (most anomalous first): the image, its map on the run's scale, the facts.

    The maps of the run's most anomalous images set the scale (:func:`core.explain.render.scale_images`),
    so their maps are drawn once, for the scale and for the cards. An image that is gone is named, not drawn.
    """
    _, scale_top = render.scale_images(run.samples["anomaly_score"].to_numpy(), run.samples["kept"].to_numpy())
    wanted = list(dict.fromkeys([*order.tolist(), *scale_top.tolist()]))  # cards first, then the rest of the scale's
    paths = {}
    for index in wanted:
        try:
            paths[index] = run.image_path(run.samples["id"].iat[index])
        except DataError as error:
            paths[index] = error
    found = [index for index in wanted if isinstance(paths[index], Path)]
    maps, scale = {}, None
    if model is not None and model.localizer is not None and found:
        maps = dict(zip(found, model.localizer.iter_anomaly_maps([paths[i] for i in found], monitor=monitor)))
        top_maps = [maps[i] for i in scale_top if i in maps]
        scale = render.run_scale(model.localizer.display_scale_, top_maps, MAP_UNITS) if top_maps else None
    content = []
    if scale is not None:
        content += [tag("p", SCALE_TEXT), tag("div", [img(render.colour_bar(scale, 160), "colour scale")],
                                              class_="colourbar")]
    elif model is not None and model.localizer is None:
        content.append(tag("p", "This run has no localization model (fitted with localization 'none'): images only."))
    cards = []
    for index in order:
        sample_id = run.samples["id"].iat[index]
        pictures = []
        image = _read_rgb(paths[index]) if isinstance(paths[index], Path) else paths[index]
        if isinstance(image, np.ndarray):
            small, heat = thumbnail_pair(image, maps.get(index), scale)
            pictures.append(img(small, f"image {sample_id}"))
            if heat is not None:
                pictures.append(img(heat, f"anomaly map of {sample_id}"))
        else:
            pictures.append(tag("p", f"image not shown: {image}", class_="missing"))
        calls = sample_calls(run, index, verdicts)
        details = tag("dl", [join([tag("dt", name), tag("dd", value)]) for name, value in calls])
        cards.append(tag("figure", [tag("div", pictures, class_="pictures"),
                                    tag("figcaption", [tag("code", sample_id), details])], class_="card"))
    return content + [tag("div", cards, class_="cards")]


def _read_rgb(path: Path) -> np.ndarray | str:
    """The image at its own size as RGB, as the Inspect page shows it; why not, as text, when it cannot be read."""
    try:
        with open_image(path) as opened:
            return np.asarray(opened.convert("RGB"))
    except Exception as error:  # noqa: BLE001 - a file changed since the fit may fail in any way PIL can
        return f"{path} cannot be read ({type(error).__name__}: {error})"


def table_samples(run: RunResults, model, dataset, order: np.ndarray, verdicts: dict) -> list:
    """The rows at ``order`` with the run's calls and, for a run on the columns themselves, their top features."""
    ids = [run.samples["id"].iat[i] for i in order]
    features, note = {}, None
    if run.config.objective != "none":
        note = ("Feature explanations need a run on the columns themselves (objective 'none'); this run scores a "
                "learned representation.")
    elif model is None or dataset is None:
        note = "The run's table could not be read again: feature explanations are not shown."
    elif ids:
        features = {row.id: row.features[:FEATURES] for row in model.explain_rows(dataset, ids, k=FEATURES)}
    rows = []
    for index, sample_id in zip(order, ids):
        calls = dict(sample_calls(run, index, verdicts))
        listed = tag("ul", [tag("li", f"{item.feature}: {item.describe()}, share {item.share:.0%}")
                            for item in features.get(sample_id, [])], class_="features")
        rows.append([int(run.samples["rank"].iat[index]), tag("code", sample_id), calls["anomaly_score"], calls["model"],
                     calls["refinement"], calls.get("label", "-"), calls.get("verdict", "-"), listed])
    return ([tag("p", note)] if note else []) + [table(
        ["rank", "id", "anomaly_score", "model", "refinement", "label", "verdict", "top features"], rows)]


def samples_section(run: RunResults, model, dataset, top: int, verdicts: dict, monitor: Monitor) -> Html:
    order = np.argsort(-run.samples["anomaly_score"].to_numpy(), kind="stable")[:top]
    title = f"The {len(order)} most anomalous samples"
    if top == 0:
        return section("top", title, [tag("p", "None asked for.")])
    try:
        content = (image_samples(run, model, order, verdicts, monitor) if run.kind == "images"
                   else table_samples(run, model, dataset, order, verdicts))
    except RefineryError as error:  # a run whose data moved still reports its numbers
        content = [tag("p", f"Samples not shown: {error}", class_="missing")]
    return section("top", title, content)


def verdicts_section(run: RunResults, verdicts: dict) -> Html:
    judged = judged_samples(run.samples, verdicts)
    if judged.empty:
        return section("verdicts", "Expert verdicts", [tag("p", "No verdicts recorded on this run's data.")])
    counts = judged["verdict"].value_counts()
    agreement = verdict_agreement(run.samples, verdicts)
    disagree = int(judged["disagrees"].sum())
    content = [
        tag("p", f"{len(judged)} samples judged: "
            + ", ".join(f"{counts.get(verdict, 0)} {verdict}" for verdict in ("normal", "anomaly", "unsure"))
            + f". The expert and the model disagree on {disagree}."),
        table(["verdict", *agreement.columns], [(name, *map(int, row)) for name, row in agreement.iterrows()],
              caption="Verdicts against the model's call at the threshold"),
        table(["rank", "id", "verdict", "note", "model", "anomaly_score", "disagrees"],
              [(row.rank, tag("code", row.id), row.verdict, row.note, row.model, score_text(row.anomaly_score),
                "yes" if row.disagrees else "") for row in judged.itertuples()], caption="Judged samples"),
    ]
    return section("verdicts", "Expert verdicts", content)


def metrics_section(run: RunResults) -> Html:
    metrics = run.metrics
    if metrics is None:
        return section("metrics", "Metrics", [tag("p", "No labels of both kinds: no metrics.")])
    scores = run.samples["anomaly_score"].to_numpy()
    confusion = confusion_at(run.labels, scores, run.threshold)
    curves = score_curves(run.labels, scores)
    content = [
        tag("p", f"Over {metrics.n_normal} labelled normal and {metrics.n_anomalous} labelled anomalous samples "
                 "(labels are used for evaluation only)."),
        facts([("AUROC", f"{metrics.auroc:.3f}"), ("average precision", f"{metrics.ap:.3f}"),
               ("F1 at the threshold", f"{metrics.f1:.3f}")]),
        table(["", *confusion.columns], [(name, *map(int, row)) for name, row in confusion.iterrows()],
              caption="Confusion at the threshold"),
        tag("div", [curve_svg(curves.fpr, curves.tpr, "false positive rate", "true positive rate", "ROC", diagonal=True),
                    curve_svg(curves.recall, curves.precision, "recall", "precision", "precision-recall")],
            class_="curves"),
    ]
    return section("metrics", "Metrics", content)
