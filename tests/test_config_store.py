"""FitConfig validation and JSON round-trip; run store: atomic files, staged folders, registry."""
import sqlite3
import sys
import threading

import numpy as np
import pytest

from core.arrays import map_arrays, read_arrays, write_arrays
from core.config import FitConfig, parse_gamma
from core.errors import ConfigError, RunError
from core.files import atomic_write_text
from core.registry import Registry
from core.staging import staged_directory
from test_memory_scale import resident_kib


def test_config_json_round_trip_and_resolution(tmp_path):
    config = FitConfig(gamma=0.2, feature_layers=("stride8", "head"), rounds=4)
    config.save(tmp_path / "config.json")
    assert FitConfig.load(tmp_path / "config.json") == config
    assert FitConfig().for_data("images").detector == "gde"
    assert FitConfig().for_data("table").detector == "knn"
    assert FitConfig(detector="ocsvm").for_data("table").detector == "ocsvm"


@pytest.mark.parametrize("changes, named", [
    ({"detector": "svm"}, "gde"), ({"gamma": 0.7}, "gamma"), ({"gamma": "often"}, "auto"),
    ({"ensemble": 0}, "ensemble"), ({"image_size": 8}, "image_size"), ({"feature_layers": ()}, "stride16"),
    ({"threshold_source": "both"}, "held_out"), ({"localization": "x"}, "memory"), ({"device": "tpu"}, "cuda"),
])
def test_config_errors_name_the_allowed_values(changes, named):
    with pytest.raises(ConfigError, match=named):
        FitConfig(**changes).validate()


def test_every_config_field_declares_its_constraints_and_help():
    from dataclasses import fields

    from core.config import FIT_PARAMS
    from core.params import accepts

    assert list(FIT_PARAMS) == [item.name for item in fields(FitConfig)]
    for name, spec in FIT_PARAMS.items():
        assert spec.constraints and spec.help.strip().endswith("."), name
        assert any(accepts(c, getattr(FitConfig(), name)) for c in spec.constraints), name
    assert "Attributes" in FitConfig.__doc__ and FIT_PARAMS["encoder"].help in FitConfig.__doc__


@pytest.mark.parametrize("changes, named", [
    ({"epochs": 2.0}, "epochs"), ({"refine": 1}, "refine"), ({"rounds": -1}, "rounds"), ({"seed": True}, "seed"),
    ({"learning_rate": 10.0}, "learning_rate"), ({"feature_layers": ("stride16", "x")}, "stride8"),
    ({"feature_layers": ["stride16"]}, "tuple"), ({"ignore_columns": ("a", 1)}, "ignore_columns"),
])
def test_config_checks_each_field_against_its_declaration(changes, named):
    with pytest.raises(ConfigError, match=named):
        FitConfig(**changes).validate()


def test_held_out_thresholds_need_two_ensemble_members_only_when_refining():
    with pytest.raises(ConfigError, match="K >= 2"):
        FitConfig(ensemble=1).validate()
    FitConfig(ensemble=1, threshold_source="in_sample").validate()
    FitConfig(ensemble=1, refine=False).validate()


def test_config_rejects_unknown_json_keys():
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        FitConfig.from_json('{"colour": "red"}')


def test_parse_gamma():
    assert parse_gamma("AUTO") == "auto" and parse_gamma("0.25") == 0.25
    with pytest.raises(ConfigError, match="gamma"):
        parse_gamma("lots")


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_arrays_round_trip_and_damage_is_reported(tmp_path):
    write_arrays(tmp_path / "x.safetensors", {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    np.testing.assert_array_equal(read_arrays(tmp_path / "x.safetensors")["a"], [[0, 1, 2], [3, 4, 5]])
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunError, match="damaged"):
        read_arrays(tmp_path / "x.safetensors")
    with pytest.raises(RunError, match="missing"):
        read_arrays(tmp_path / "nope.safetensors")


def test_staged_directory_appears_only_on_success(tmp_path):
    with pytest.raises(ValueError):
        with staged_directory(tmp_path / "run") as staging:
            (staging / "half.txt").write_text("half")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(tmp_path / "run") as staging:
        (staging / "whole.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and (tmp_path / "run" / "whole.txt").exists()


def test_registry_lifecycle_rounds_and_verdicts(tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    run_id = registry.start_run(tmp_path / "run", kind="table", data_source="t.csv", fingerprint="f",
                                n_samples=10, config={"seed": 0})
    registry.add_round(run_id, round=1, n_active=10, n_removed=2, gamma=0.1, precision=0.5, recall=1.0,
                       seconds=0.1, note="round 1")
    registry.finish_run(run_id, {"auroc": 0.9})
    registry.set_verdict(run_id, "3", "anomaly", "scratch")
    registry.set_verdict(run_id, "3", "normal")  # a changed mind replaces the verdict
    [record] = registry.runs()
    assert record.status == "done" and record.metrics == {"auroc": 0.9} and record.config == {"seed": 0}
    assert registry.rounds(run_id)[0]["n_removed"] == 2
    assert registry.verdicts(run_id) == {"3": ("normal", "")}
    with pytest.raises(sqlite3.IntegrityError):
        registry.set_verdict(run_id, "4", "maybe")


def test_registry_survives_concurrent_writers(tmp_path):
    path = tmp_path / "r.sqlite"
    errors = []

    def writer(worker):
        try:
            registry = Registry(path)
            for i in range(20):
                run_id = registry.start_run(tmp_path / f"{worker}-{i}", kind="table", data_source="x",
                                            fingerprint="f", n_samples=1, config={})
                registry.finish_run(run_id, {})
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(Registry(path).runs()) == 80


def test_arrays_of_every_dtype_and_shape_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.normal(size=(3000, 700)).astype(np.float32),  # more than one 8 MiB chunk
        "f64": rng.normal(size=(4, 2)), "i64": np.arange(5), "i16": np.arange(3, dtype=np.int16),
        "i8": np.array([-1, 0, 1], np.int8), "u8": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        "bool": np.array([True, False]), "empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5),
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
    }
    write_arrays(tmp_path / "x.safetensors", arrays)
    saved = read_arrays(tmp_path / "x.safetensors")
    assert saved.keys() == arrays.keys()
    for name, array in arrays.items():
        assert saved[name].shape == array.shape, name
        np.testing.assert_array_equal(saved[name], array)
    with pytest.raises(TypeError, match="no dtype"):
        write_arrays(tmp_path / "y.safetensors", {"text": np.array(["a"])})
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are only handed back on Linux")
def test_saving_memory_mapped_embeddings_streams_them(tmp_path):
    source = tmp_path / "e.npy"
    np.save(source, np.random.default_rng(0).normal(size=(20_000, 128)).astype(np.float32))  # 10 MiB
    features = np.load(source, mmap_mode="r")
    write_arrays(tmp_path / "run.safetensors", {"train": features, "kept": np.ones(len(features), np.uint8)})
    assert resident_kib(source) <= 8 * 1024 + 4  # at most one 8 MiB chunk of the source stays resident
    saved = read_arrays(tmp_path / "run.safetensors")
    np.testing.assert_array_equal(saved["train"], features)
    assert saved["kept"].sum() == len(features)


def test_mapped_arrays_are_the_saved_arrays_without_reading_them(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"train": rng.normal(size=(5000, 64)).astype(np.float32), "kept": np.ones(5000, np.uint8),
              "empty": np.zeros((0, 4), np.float64), "scores": rng.normal(size=5000)}
    write_arrays(tmp_path / "e.safetensors", arrays)
    mapped = map_arrays(tmp_path / "e.safetensors")
    assert mapped.keys() == arrays.keys()
    for name, array in arrays.items():
        assert mapped[name].dtype == array.dtype and mapped[name].shape == array.shape
        np.testing.assert_array_equal(mapped[name], array)
    assert isinstance(mapped["train"], np.memmap) and not mapped["train"].flags.writeable


@pytest.mark.parametrize("damage", ["truncated", "huge header", "bad json", "unknown dtype", "range past the end",
                                    "range of the wrong size"])
def test_a_damaged_arrays_file_is_a_run_error_when_mapped(tmp_path, damage):
    path = tmp_path / "e.safetensors"
    write_arrays(path, {"train": np.ones((10, 4), np.float32)})
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode()
    body = data[8 + length :]
    if damage == "truncated":
        data = data[:-8]
    elif damage == "huge header":
        data = (10**12).to_bytes(8, "little") + data[8:]
    elif damage == "bad json":
        data = data[:8] + b"{" * length + body
    else:
        replaced = {"unknown dtype": header.replace('"F32"', '"X32"'),
                    "range past the end": header.replace("[0,160]", "[0,990]"),
                    "range of the wrong size": header.replace("[0,160]", "[0,150]")}[damage]
        assert replaced != header
        data = data[:8] + replaced.encode() + body
    path.write_bytes(data)
    with pytest.raises(RunError, match="damaged or was tampered with"):
        map_arrays(path)
