"""The built-in granite demo (issue 18, point 6): a default fit's time, refinement, image and pixel metrics.

The studio's built-in ``granite`` set (``core.data.builtin``, seed 0: 240 tiles of 128 x 128 px, 24 with a
planted scratch, crack, stain or chip and its mask) is fitted with the FitConfig defaults, as the Data
page's demo or ``refinery fit`` fits it, in this process. Reported: the fit's wall and CPU time and its
stages (``FitResult.timings``), what refinement removed, the image AUROC / AP of the run's
``anomaly_score`` and of its map score, and the pixel AUROC / AUPRO of the run's maps of all 240 tiles
(no mask = all normal), by defect kind too.

Run: ``python bench/granite_demo.py --out bench/results/granite_demo.txt``
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from bench.common import Report, base_parser, machine_footer, machine_header, progress, setup_logging, timed
from core import engine
from core.config import FitConfig
from core.data import load_dataset
from core.data.builtin import prepare_builtin
from core.data.textures import DEFECT_KINDS
from core.image_score import map_scores
from core.pixel_metrics import PixelMetricAccumulator


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report(args.out)
    machine_header(report, "The granite demo: a default fit (issue 18)")
    with timed() as total, tempfile.TemporaryDirectory() as scratch:
        workspace = Path(scratch)
        os.environ["REFINERY_HOME"] = scratch      # the run registry of this fit, not the user's
        data = load_dataset(prepare_builtin("granite", workspace, seed=args.seeds[0]), workspace=workspace)
        progress(f"fitting {len(data)} tiles with the defaults")
        cpu_before = cpu_seconds()
        with timed() as fit_time:
            result = engine.fit(data, FitConfig(), workspace / "run")
        fit_cpu = cpu_seconds() - cpu_before
        run = engine.open_run(workspace / "run")
        progress("maps of every tile")
        overall = PixelMetricAccumulator()
        by_kind = {kind: PixelMetricAccumulator() for kind in DEFECT_KINDS}
        with timed() as map_time:
            for sample_id, anomaly_map in run.iter_anomaly_maps(data):
                mask = (np.asarray(Image.open(data.masks[sample_id])) > 127 if sample_id in data.masks
                        else np.zeros(anomaly_map.shape, dtype=bool))
                overall.update(anomaly_map, mask)
                if sample_id in data.masks:
                    by_kind[sample_id.split("/")[1].split("-")[0]].update(anomaly_map, mask)
        mapped = map_scores(run.localizer, data.paths)
    labels, score = data.labels, result.scores.anomaly_score
    removed = ~result.kept
    kinds = {kind: sum(1 for i in np.flatnonzero(removed & (labels == 1)) if f"/{kind}-" in data.ids[i])
             for kind in DEFECT_KINDS}
    pixels = overall.result()
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.timings.items())
    report.table(["figure", "value"], [
        ["fit wall time s", fit_time.seconds], ["fit CPU time s (this process)", fit_cpu],
        ["fit stages", stages],
        ["image score", result.image_score.describe()],
        ["kept after refinement", f"{int(result.kept.sum())} of {len(data)}"],
        ["planted anomalies removed", f"{int((removed & (labels == 1)).sum())} of {int(labels.sum())} ("
         + ", ".join(f"{kind} {count}" for kind, count in kinds.items()) + f"); normals removed "
         f"{int((removed & (labels == 0)).sum())} of {int((labels == 0).sum())}"],
        ["image AUROC / AP of the run's anomaly_score", f"{roc_auc_score(labels, score):.3f} / "
                                                         f"{average_precision_score(labels, score):.3f}"],
        ["image AUROC of the final localizer's map score", roc_auc_score(labels, mapped)],
        ["pixel AUROC / AUPRO (FPR <= 0.3)", f"{pixels.auroc:.3f} / {pixels.aupro:.3f} ({pixels.n_regions} regions)"],
        ["pixel AUROC by kind", ", ".join(f"{kind} {acc.result().auroc:.3f}" for kind, acc in by_kind.items())],
        ["maps of the 240 tiles s", map_time.seconds],
    ], title="Default fit of the built-in granite set")
    report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
