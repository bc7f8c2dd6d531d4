"""Exploration that chose issue 18's border gain (``core.explain.localizer.border_gain``): which highs of the
held-out normal maps to even out across the distances to the edge, and whether to weigh the maps or only
the map score.

Dev set: the built-in granite tiles (``core.data.textures``): the default localizer (``memory``, 224 px)
is fitted on ``--normals`` defect-free tiles of seed 0; the maps of ``--reference`` further ones set the
gains compared; the test set is ``--test-normals`` further defect-free tiles and 24 defective tiles of
seed 1 (6 per kind) with their masks. For each gain (none, each ``--quantiles`` of the ring's values,
and the one the fit itself set from its held-out share, as a run does) the report gives
the image AUROC of the top-1% mean of the working-size map weighed by the gain (the map score) and the
pixel AUROC / AUPRO of the maps with and without the gain, and where normal maps peak. Confirmed on the
magnetic tiles' dev split with ``bench/localization.py --explore --quick --variants default "no border
gain"`` (pixel metrics drop when the maps themselves are weighed: breaks and frays sit at tile edges).

Run: ``python bench/border_gain.py --threads 1 --out bench/results/border_gain.txt``
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench.common import Report, base_parser, machine_footer, machine_header, progress, setup_logging, timed
from core.config import FitConfig
from core.data.textures import DEFECT_KINDS, TILE_SIZE, write_texture_set
from core.explain.localizer import border_gain, ring_index, ring_values
from core.image_score import MAP_TOP_SHARE
from core.pipeline import make_localizer
from core.pixel_metrics import PixelMetricAccumulator


def pixel_metrics(maps: np.ndarray, masks: list[np.ndarray]) -> tuple[float, float]:
    accumulator = PixelMetricAccumulator()
    for anomaly_map, mask in zip(maps, masks):
        accumulator.update(anomaly_map, mask)
    result = accumulator.result()
    return result.auroc, result.aupro


def top_share_mean(maps: np.ndarray) -> np.ndarray:
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)
    return flat[:, -max(1, int(np.ceil(MAP_TOP_SHARE * flat.shape[1]))):].mean(axis=1)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    parser.add_argument("--normals", type=int, default=120, help="defect-free tiles fitted (seed 0)")
    parser.add_argument("--reference", type=int, default=12, help="further defect-free tiles whose maps set the gains")
    parser.add_argument("--test-normals", type=int, default=20, help="further defect-free test tiles (seed 0)")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    report = Report(args.out)
    machine_header(report, "Border gain of the map score: which highs to even out (issue 18 exploration)")
    with timed() as total, tempfile.TemporaryDirectory() as scratch:
        normal_folder, defect_folder = Path(scratch) / "normal", Path(scratch) / "defective"
        normal_folder.mkdir(), defect_folder.mkdir()
        write_texture_set(normal_folder, args.normals + args.reference + args.test_normals, 0, seed=0)
        write_texture_set(defect_folder, 0, 6 * len(DEFECT_KINDS), seed=1)
        normals = sorted((normal_folder / "good").glob("*.png"))
        defects = sorted(p for p in (defect_folder / "other").glob("*.png") if not p.stem.endswith("_mask"))
        config = FitConfig(device="cpu").for_data("images", TILE_SIZE)
        progress(f"fitting the {config.localization} localizer at {config.image_size} px on {args.normals} tiles")
        localizer = make_localizer(config).fit(normals[:args.normals])
        size = localizer.image_size
        reference = np.stack(localizer.anomaly_maps(normals[args.normals:args.normals + args.reference], output_size=size))
        test = normals[args.normals + args.reference:] + defects
        maps = np.stack(localizer.anomaly_maps(test, output_size=size))
        labels = np.r_[np.zeros(len(test) - len(defects)), np.ones(len(defects))]
        masks = [np.zeros((size, size), dtype=bool)] * (len(test) - len(defects)) + [
            np.asarray(Image.open(p.with_name(p.stem + "_mask.png")).resize((size, size))) > 127 for p in defects]
        outer = (ring_index(size) < size // 8).numpy()
        gains = {"none": None, **{f"highs at q={q}": border_gain(torch.from_numpy(reference), q) for q in args.quantiles},
                 "the fitted localizer's own (q=0.99 of its held-out share)": localizer.border_gain_}
        raw_pixel = pixel_metrics(maps, masks)
        rows = []
        for name, gain in gains.items():
            weighed = maps * ring_values(gain, size).numpy()
            peaks = np.mean([outer.flat[int(np.argmax(m))] for m in weighed[labels == 0]])
            rows.append([name, roc_auc_score(labels, top_share_mean(weighed)), *raw_pixel, *pixel_metrics(weighed, masks),
                         peaks, float(ring_values(gain, size).min())])
    report.line(f"{args.normals} fitted tiles, {args.reference} more set the gains, test {len(test) - len(defects)} "
                f"normal + {len(defects)} defective tiles; {size} px working size; outer ring = within {size // 8} px "
                f"of the edge ({outer.mean():.0%} of the pixels).")
    report.table(["gain", "image AUROC (map score)", "pixel AUROC, maps as computed", "AUPRO, as computed",
                  "pixel AUROC, maps weighed", "AUPRO, weighed", "normal maps peaking in the outer ring", "lowest gain"],
                 rows, title="Granite (dev): the map score and the maps under each gain")
    report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
