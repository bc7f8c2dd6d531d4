"""The run report: one self-contained HTML file of a saved run, for a colleague without the studio.

It holds the data, the settings, the refinement rounds, the score histogram with the threshold and its
meaning, the most anomalous samples with their images and anomaly maps (tables: their top features),
the expert's verdicts and, where labels exist, the metrics. Images are embedded as ``data:`` URIs and
charts are inline SVG: the file opens offline and loads nothing from anywhere.

Example
-------
>>> write_report("runs/demo", "report.html", top=12)   # doctest: +SKIP
"""
from core.report.build import DEFAULT_TOP, report_html, write_report

__all__ = ["DEFAULT_TOP", "report_html", "write_report"]
