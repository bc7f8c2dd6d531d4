"""The refinery command line, end to end on small real data, including the bad-input contract."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.cli import main
from core.config import FitConfig
from core.registry import Registry
from sample_data import write_digits_images, write_digits_table


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def registry_rows():
    return Registry().runs()


def fails_cleanly(capsys, argv, message):
    """The CLI exits 1 with a one-line error containing ``message`` and registers no run."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err and err[-1].startswith("refinery: error:") and message in err[-1], err
    assert all(run.status != "running" for run in registry_rows())
    return err[-1]


def test_fit_and_score_a_table_end_to_end(tmp_path, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    run = tmp_path / "run"
    assert main(["fit", str(table), "--out", str(run), "--label-column", "label"]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "run saved" in out
    for name in ("config.json", "run.json", "embeddings.safetensors", "scores.csv", "refinement.json"):
        assert (run / name).is_file()
    scores_path = tmp_path / "scores.csv"
    assert main(["score", str(run), str(table), "--out", str(scores_path)]) == 0
    scores = pd.read_csv(scores_path)
    assert list(scores.columns) == ["id", "anomaly_score", "is_anomaly", "label"]
    assert scores["id"].tolist() == list(range(len(scores)))
    assert set(scores["is_anomaly"]) <= {0, 1}
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(scores["label"], scores["anomaly_score"]) > 0.9
    [record] = registry_rows()
    assert record.status == "done" and record.metrics["auroc"] > 0.9
    assert main(["runs"]) == 0 and record.run_id in capsys.readouterr().out


def test_fit_and_score_images_end_to_end(tmp_path, capsys):
    folder = write_digits_images(tmp_path / "digits", n_normal=60, n_anomalous=6)
    run = tmp_path / "run"
    assert main(["fit", str(folder), "--out", str(run), "--image-size", "64", "--ensemble", "3"]) == 0
    saved = FitConfig.load(run / "config.json")
    assert (saved.detector, saved.refine_detector) == ("gde", "mcd"), "auto resolved for images"
    # Score other modes and sizes: converted, not rejected.
    other = tmp_path / "other"
    other.mkdir()
    Image.new("L", (50, 70), 30).save(other / "gray.png")
    Image.new("RGBA", (90, 40), (200, 10, 10, 128)).save(other / "rgba.png")
    Image.new("P", (64, 64)).save(other / "palette.bmp")
    out_csv = tmp_path / "s.csv"
    maps = tmp_path / "maps"
    assert main(["score", str(run), str(other), "--out", str(out_csv), "--maps", str(maps)]) == 0
    scores = pd.read_csv(out_csv)
    assert sorted(scores["id"]) == ["gray.png", "palette.bmp", "rgba.png"]
    assert np.isfinite(scores["anomaly_score"]).all()
    # DESIGN.md: one float32 map per image, the image's own height and width, suffix replaced by .npy.
    assert sorted(p.name for p in maps.iterdir()) == ["gray.npy", "palette.npy", "rgba.npy"]
    for name, (width, height) in {"gray": (50, 70), "rgba": (90, 40), "palette": (64, 64)}.items():
        anomaly_map = np.load(maps / f"{name}.npy", allow_pickle=False)
        assert anomaly_map.dtype == np.float32 and anomaly_map.shape == (height, width)
        assert np.isfinite(anomaly_map).all() and anomaly_map.min() >= 0
    cams = tmp_path / "cams"
    assert main(["explain", str(run), str(other), "--out", str(cams), "--method", "gradcam++"]) == 0
    for name, (width, height) in {"gray": (50, 70), "rgba": (90, 40)}.items():
        cam = np.load(cams / f"{name}.npy", allow_pickle=False)
        assert cam.dtype == np.float32 and cam.shape == (height, width) and np.isfinite(cam).all()


def test_self_supervised_fit_and_score_a_table(tmp_path, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    run = tmp_path / "run"
    argv = ["fit", str(table), "--out", str(run), "--label-column", "label", "--objective", "contrastive-imix",
            "--epochs", "3", "--retrain-epochs", "1", "--rounds", "2"]
    assert main(argv) == 0
    assert "run saved" in capsys.readouterr().out
    assert (run / "ssl_encoder.safetensors").is_file() and (run / "ssl_encoder_round_1.safetensors").is_file()
    assert main(["score", str(run), str(table), "--out", str(tmp_path / "scores.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "scores.csv")) == len(pd.read_csv(table))


def test_an_image_objective_on_a_table_fails_cleanly(tmp_path, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    fails_cleanly(capsys, ["fit", str(table), "--out", str(tmp_path / "r"), "--objective", "cutpaste"], "tables allow")


def test_runs_lists_why_a_run_failed(tmp_path, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    registry = Registry()
    run_id = registry.start_run(tmp_path / "r", kind="table", data_source=str(table), fingerprint="f",
                                n_samples=3, config={})
    registry.fail_run(run_id, "cancelled by the user")
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert run_id in out and "why: cancelled by the user" in out


def test_console_script_runs_and_exit_codes(tmp_path):
    table = write_digits_table(tmp_path / "digits.csv", n_normal=40, n_anomalous=4)
    env = {**os.environ, "REFINERY_HOME": str(tmp_path / "home")}
    ok = subprocess.run([sys.executable, "-m", "core.cli", "fit", str(table), "--out", str(tmp_path / "r")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "core.cli", "fit", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r2")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "core.cli", "fit"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--backbone", "--objective", "--encoder", "--epochs", "--retrain-epochs",
                   "--learning-rate", "--detector", "--refine-detector", "--refine", "--no-refine", "--ensemble",
                   "--gamma", "--rounds", "--device", "--seed", "--label-column"):
        assert option in text


def fit_options() -> dict:
    """``fit``'s options by destination, from the parser itself."""
    from core.cli import build_parser

    [commands] = [action for action in build_parser()._actions if action.dest == "command"]
    return {action.dest: action for action in commands.choices["fit"]._actions}


def test_fit_options_are_derived_from_the_config_fields():
    """One option per FitConfig field, whose choices, default and help are the field's: they cannot drift."""
    from core.config import FIT_PARAMS
    from core.params import interval_of, options_of

    options = fit_options()
    for name, spec in FIT_PARAMS.items():
        action = options[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        choices = options_of(spec.constraints)
        if action.choices is not None:
            assert tuple(action.choices) == choices, name
        else:  # a number or a keyword (gamma, image size), free text, a list or a switch: no argparse choices
            assert not choices or interval_of(spec.constraints) is not None, name
        assert spec.help.replace("%", "%%") in action.help, name
    from core.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["fit", "DATA", "--out", "R"])
    assert _config_from_args(args) == FitConfig(), "the options' defaults are the config's"


def test_fit_options_parse_lists_switches_and_keywords(capsys):
    from core.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["fit", "DATA", "--out", "R", "--feature-layers", "stride8, head",
                                      "--ignore-columns", "a,,b", "--no-refine", "--gamma", "AUTO",
                                      "--label-column", "none", "--learning-rate", "0.01"])
    config = _config_from_args(args)
    assert config.feature_layers == ("stride8", "head") and config.ignore_columns == ("a", "b")
    assert (config.refine, config.gamma, config.label_column, config.learning_rate) == (False, "auto", "none", 0.01)
    assert _config_from_args(build_parser().parse_args(["fit", "D", "--out", "R", "--gamma", "0.2"])).gamma == 0.2
    with pytest.raises(SystemExit) as exit_info:  # a wrong command line: usage error, not a traceback
        build_parser().parse_args(["fit", "D", "--out", "R", "--gamma", "lots"])
    assert exit_info.value.code == 2 and "gamma must be a number in (0, 0.5] or 'auto'" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input


def test_missing_path(tmp_path, capsys):
    fails_cleanly(capsys, ["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "does not exist")
    assert not (tmp_path / "r").exists()


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails_cleanly(capsys, ["fit", str(tmp_path / "empty"), "--out", str(tmp_path / "r")], "empty")


def test_folder_with_no_readable_image(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    (folder / "b.jpg").write_bytes(b"")
    fails_cleanly(capsys, ["fit", str(folder), "--out", str(tmp_path / "r")], "no readable image")


def test_corrupt_image_is_skipped_with_count(tmp_path, capsys):
    folder = write_digits_images(tmp_path / "digits", labelled_folders=False, n_normal=30, n_anomalous=3)
    (folder / "all" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = folder / "all" / "0000.png"
    (folder / "all" / "truncated.png").write_bytes(good.read_bytes()[:60])
    code = main(["fit", str(folder), "--out", str(tmp_path / "r"), "--image-size", "32", "--ensemble", "3"])
    err = capsys.readouterr().err
    assert code == 0
    assert "skipped 2 unreadable file(s)" in err and "broken.png" in err and "truncated.png" in err


def test_zip_with_parent_entries_is_refused(tmp_path, capsys):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.png", b"x")
    fails_cleanly(capsys, ["fit", str(archive), "--out", str(tmp_path / "r")], "..")
    assert not (tmp_path / "evil.png").exists()


def test_zip_over_the_size_limit_is_refused(tmp_path, capsys, monkeypatch):
    import core.data.archive as archive_module

    # A 10 kB cap stands in for the 2 GiB default, which a test cannot afford to exceed.
    monkeypatch.setitem(archive_module.extract_zip.__kwdefaults__, "max_total_bytes", 10_000)
    folder = write_digits_images(tmp_path / "digits", n_normal=30, n_anomalous=3)
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder).as_posix())
    fails_cleanly(capsys, ["fit", str(archive), "--out", str(tmp_path / "r")], "limit")


def test_table_with_too_few_rows(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv", n_normal=8, n_anomalous=2)
    fails_cleanly(capsys, ["fit", str(table), "--out", str(tmp_path / "r")], "too few")


def test_single_row_table(tmp_path, capsys):
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(tmp_path / "one.csv", index=False)
    fails_cleanly(capsys, ["fit", str(tmp_path / "one.csv"), "--out", str(tmp_path / "r")], "too few")


def test_text_columns_that_cannot_be_encoded(tmp_path, capsys):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=200), "name": [f"user-{i % 120}" for i in range(200)]})  # not an id
    frame.to_csv(tmp_path / "t.csv", index=False)
    fails_cleanly(capsys, ["fit", str(tmp_path / "t.csv"), "--out", str(tmp_path / "r")], "'name'")


def test_nan_and_inf_are_imputed(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv", with_labels=False)
    frame = pd.read_csv(table)
    frame.iloc[3, 5] = np.nan
    frame.iloc[7, 9] = np.inf
    frame.to_csv(table, index=False)
    assert main(["fit", str(table), "--out", str(tmp_path / "r")]) == 0
    assert main(["score", str(tmp_path / "r"), str(table), "--out", str(tmp_path / "s.csv")]) == 0
    assert np.isfinite(pd.read_csv(tmp_path / "s.csv")["anomaly_score"]).all()


def test_maps_for_a_table_run_are_refused(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv", with_labels=False)
    assert main(["fit", str(table), "--out", str(tmp_path / "r")]) == 0
    fails_cleanly(capsys, ["score", str(tmp_path / "r"), str(table), "--out", str(tmp_path / "s.csv"),
                           "--maps", str(tmp_path / "maps")], "no localization model")
    assert not (tmp_path / "maps").exists() and not (tmp_path / "s.csv").exists()


def test_score_with_mismatched_columns(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv", with_labels=False)
    assert main(["fit", str(table), "--out", str(tmp_path / "r")]) == 0
    pd.read_csv(table).drop(columns=["px10", "px11"]).to_csv(tmp_path / "other.csv", index=False)
    fails_cleanly(capsys, ["score", str(tmp_path / "r"), str(tmp_path / "other.csv"), "--out", str(tmp_path / "s.csv")],
                  "px10")
    assert not (tmp_path / "s.csv").exists()


def test_score_images_with_a_table_run(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv", with_labels=False)
    assert main(["fit", str(table), "--out", str(tmp_path / "r")]) == 0
    folder = write_digits_images(tmp_path / "imgs", n_normal=5, n_anomalous=1)
    fails_cleanly(capsys, ["score", str(tmp_path / "r"), str(folder), "--out", str(tmp_path / "s.csv")], "table")


def test_out_folder_that_is_not_empty(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    fails_cleanly(capsys, ["fit", str(table), "--out", str(tmp_path / "r")], "not empty")
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


def test_bad_option_values_are_named(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv")
    fails_cleanly(capsys, ["fit", str(table), "--out", str(tmp_path / "r"), "--gamma", "0.9"], "gamma")
    fails_cleanly(capsys, ["fit", str(table), "--out", str(tmp_path / "r"), "--feature-layers", "stride4"], "stride16")


def test_score_reuses_the_run_label_column_when_present(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv")
    assert main(["fit", str(table), "--out", str(tmp_path / "r"), "--label-column", "label"]) == 0
    assert main(["score", str(tmp_path / "r"), str(table), "--out", str(tmp_path / "s.csv")]) == 0
    assert "label" in pd.read_csv(tmp_path / "s.csv").columns
    pd.read_csv(table).drop(columns=["label"]).to_csv(tmp_path / "new.csv", index=False)
    assert main(["score", str(tmp_path / "r"), str(tmp_path / "new.csv"), "--out", str(tmp_path / "n.csv")]) == 0
    assert "label" not in pd.read_csv(tmp_path / "n.csv").columns


def test_explain_lists_the_planted_deviating_feature(tmp_path, capsys):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(300, 6)), columns=[f"f{i}" for i in range(6)])
    frame.loc[17, "f4"] = 25.0  # one row, one feature far outside the usual range
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert main(["fit", str(tmp_path / "t.csv"), "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    out_csv = tmp_path / "why.csv"
    assert main(["explain", str(tmp_path / "r"), str(tmp_path / "t.csv"), "--top", "1", "--out", str(out_csv)]) == 0
    legend, row, first = capsys.readouterr().out.splitlines()[:3]
    assert legend.startswith("Each feature: the row's value against the typical range") and "share = " in legend
    assert row.startswith("row 17:") and first.split()[0] == "f4" and "above the typical" in first
    why = pd.read_csv(out_csv)
    assert why.iloc[0]["feature"] == "f4" and why.iloc[0]["value"] == pytest.approx(25.0)
    assert why.iloc[0]["description"].startswith("25: ") and why.iloc[0]["robust_z"] > 10
    fails_cleanly(capsys, ["explain", str(tmp_path / "r"), str(tmp_path / "t.csv"), "--ids", "9999"], "9999")


def test_export_the_refined_table_and_the_kept_rows(tmp_path, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    run = tmp_path / "run"
    assert main(["fit", str(table), "--out", str(run), "--label-column", "label"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--table", "--out", str(tmp_path / "refined.csv")]) == 0
    refined = pd.read_csv(tmp_path / "refined.csv")
    assert list(refined.columns) == ["id", "anomaly_score", "is_anomaly", "label", "kept", "round_removed", "votes",
                                     "verdict", "verdict_note"]
    scores = pd.read_csv(run / "scores.csv")
    assert refined["kept"].tolist() == scores["kept"].tolist() and 0 < refined["kept"].sum() < len(refined)
    assert f"{len(refined)} samples ({refined['kept'].sum()} kept)" in capsys.readouterr().out
    for out in (tmp_path / "kept", tmp_path / "kept.zip"):
        assert main(["export", str(run), "--kept", "--out", str(out)]) == 0
        assert f"{refined['kept'].sum()} of {len(refined)} rows kept" in capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "kept" / "digits-kept.csv")
    pd.testing.assert_frame_equal(rows, pd.read_csv(table)[refined["kept"] == 1].reset_index(drop=True))
    with zipfile.ZipFile(tmp_path / "kept.zip") as archive:
        assert sorted(archive.namelist()) == ["digits-kept.csv", "refined.csv"]
    fails_cleanly(capsys, ["export", str(run), "--kept", "--out", str(tmp_path / "kept")], "not empty")
    fails_cleanly(capsys, ["export", str(tmp_path / "nowhere"), "--table", "--out", str(tmp_path / "r.csv")],
                  "not a Refinery run")
    with pytest.raises(SystemExit) as exit_info:  # one of --kept / --table is required
        main(["export", str(run), "--out", str(tmp_path / "x.zip")])
    assert exit_info.value.code == 2


def test_report_writes_one_html_file_and_refuses_bad_input(tmp_path, capsys):
    table = write_digits_table(tmp_path / "t.csv")
    assert main(["fit", str(table), "--out", str(tmp_path / "r"), "--label-column", "label"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "report.html"), "--top", "3"]) == 0
    assert "run report written to" in capsys.readouterr().out
    text = (tmp_path / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count('<ul class="features">') == 3 and "AUROC" in text
    fails_cleanly(capsys, ["report", str(tmp_path / "r"), "--out", str(tmp_path / "x.html"), "--top", "-2"], "top")
    fails_cleanly(capsys, ["report", str(tmp_path), "--out", str(tmp_path / "x.html")], "not a Refinery run")
    assert not (tmp_path / "x.html").exists()
