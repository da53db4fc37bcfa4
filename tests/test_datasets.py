"""ResumablePartitionedDataset: a file under its final name is complete, and a save resumes."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet
import pytest
import yaml
from kedro.io import AbstractDataset, DatasetError
from PIL import Image

from clip_dfkd.atomic import OutOfSpaceError
from clip_dfkd.cli import user_error_message
from clip_dfkd.datasets import ResumablePartitionedDataset

REPO_ROOT = Path(__file__).resolve().parents[1]


class _DiesMidWrite(AbstractDataset[str, str]):
    """Writes half of its text, then fails: a crash (or SIGKILL) during a partition's write."""

    def __init__(self, filepath: str) -> None:
        self._filepath = filepath

    def load(self) -> str:
        raise AssertionError("never loaded")

    def save(self, data: str) -> None:
        Path(self._filepath.removeprefix("file://")).write_text(data[: len(data) // 2])
        raise OSError("disk died")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}


def _text(path: Path, dataset: Any = "text.TextDataset") -> ResumablePartitionedDataset:
    return ResumablePartitionedDataset(path=str(path), dataset=dataset, filename_suffix=".txt")


def _lazy(calls: list[str], name: str, text: str):
    def render() -> str:
        calls.append(name)
        return text

    return render


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_image_preview_fits_kedro_vizs_panel_and_captions_each_image_with_its_prompt(tmp_path: Path) -> None:
    import base64
    import io

    from clip_dfkd.rendering import attach_record

    dataset = ResumablePartitionedDataset(path=str(tmp_path), dataset="pillow.ImageDataset", filename_suffix=".png")
    # black images whose records name a prompt, but the last: its caption falls back to its id
    prompted = {
        f"image{n}": attach_record(Image.new("RGB", (32, 32)), {"prompt": "a sketch of a tent"}) for n in range(7)
    }
    dataset.save(prompted | {"image7": Image.new("RGB", (32, 32))})

    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(dataset.preview()))).convert("L"))
    assert grid.shape == (2 * 126, 4 * 96)  # two rows of four: tiles of 96 px and two caption lines
    captions = [
        grid[row * 126 + 96 : (row + 1) * 126, column * 96 : (column + 1) * 96] for row in (0, 1) for column in range(4)
    ]
    assert all((caption < 128).any() for caption in captions)  # dark text on white under every image


def test_save_skips_existing_partitions_without_calling_their_loader(tmp_path: Path) -> None:
    dataset = _text(tmp_path)
    calls: list[str] = []
    dataset.save({"a/1": _lazy(calls, "a/1", "first")})

    dataset.save({"a/1": _lazy(calls, "a/1 again", "second"), "a/2": _lazy(calls, "a/2", "two")})

    assert calls == ["a/1", "a/2"]
    assert _files(tmp_path) == {"a/1.txt": "first", "a/2.txt": "two"}


def test_a_leftover_partial_file_is_not_loaded_and_does_not_block_a_resave(tmp_path: Path) -> None:
    dataset = _text(tmp_path)
    dataset.save({"a/1": "one"})
    (tmp_path / "a" / "2.partial.txt").write_text("tru")  # a write killed before its rename

    assert sorted(dataset.load()) == ["a/1"]
    dataset.save({"a/1": "one", "a/2": "two"})

    assert _files(tmp_path) == {"a/1.txt": "one", "a/2.txt": "two"}


@pytest.mark.parametrize("failure", ["producer raises", "write dies midway"])
def test_a_failed_partition_leaves_no_final_file_and_is_done_by_the_next_save(tmp_path: Path, failure: str) -> None:
    def broken() -> str:
        raise RuntimeError("generator out of memory")

    if failure == "producer raises":
        failing, data = _text(tmp_path), {"a/1": "one", "a/2": broken}
    else:
        failing, data = _text(tmp_path, _DiesMidWrite), {"a/2": "two"}
        _text(tmp_path).save({"a/1": "one"})

    with pytest.raises(DatasetError):
        failing.save(data)

    assert not (tmp_path / "a" / "2.txt").exists()
    assert sorted(_text(tmp_path).load()) == ["a/1"]
    _text(tmp_path).save({"a/1": "one", "a/2": "two"})
    assert {k: v for k, v in _files(tmp_path).items() if ".partial" not in k} == {"a/1.txt": "one", "a/2.txt": "two"}


def test_load_returns_exactly_the_complete_partitions(tmp_path: Path) -> None:
    dataset = _text(tmp_path)
    assert not dataset.exists()
    with pytest.raises(DatasetError, match="No complete partitions"):
        dataset.load()

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "9.partial.txt").write_text("tru")
    (tmp_path / "b" / "notes.md").write_text("not a partition")
    assert not dataset.exists()  # staging files alone are not data

    dataset.save({"a/1": "one", "b/2": "two"})

    loaded = dataset.load()
    assert dataset.exists()
    assert {partition_id: load() for partition_id, load in loaded.items()} == {"a/1": "one", "b/2": "two"}


@pytest.mark.parametrize("partition_id", ["../escape", "/abs", "a/1.partial"])
def test_partition_ids_stay_inside_the_folder_and_never_look_like_staging_files(
    tmp_path: Path, partition_id: str
) -> None:
    with pytest.raises(DatasetError, match="must be a relative path"):
        _text(tmp_path / "root").save({partition_id: "x"})
    assert not any(tmp_path.rglob("*.txt"))


def test_the_catalog_entry_builds_a_dataset_that_kedro_viz_can_describe(tmp_path: Path) -> None:
    entry = yaml.safe_load((REPO_ROOT / "conf/base/catalog.yml").read_text())["synthetic_images"]
    dataset = AbstractDataset.from_config("synthetic_images", {**entry, "path": str(tmp_path)})

    dataset.save({"ball/0": Image.new("RGB", (4, 4), (10, 0, 0))})

    assert dataset._describe()["path"] == str(tmp_path)  # kedro-viz shows it as the file path
    assert dataset.exists()
    assert (tmp_path / "ball" / "0.png").is_file()
    assert np.asarray(dataset.load()["ball/0"]())[0, 0, 0] == 10


def test_a_table_is_saved_and_also_logged_as_an_mlflow_table(tmp_path: Path) -> None:
    import mlflow

    from clip_dfkd.datasets import MlflowTableDataset

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("tables", artifact_location=(tmp_path / "artifacts").as_uri())
    table = pd.DataFrame({"domain": ["photo", "night"], "student_top1": [0.8, None]})
    dataset = MlflowTableDataset(
        dataset={"type": "pandas.CSVDataset", "filepath": str(tmp_path / "t.csv"), "save_args": {"index": False}},
        artifact_file="ood_evaluation/table.json",
    )

    with mlflow.start_run(experiment_id=experiment) as logged:
        dataset.save(table)
    with mlflow.start_run(experiment_id=experiment) as untracked:
        dataset._logging_activated = False  # as kedro-mlflow switches off a pipeline it does not track
        dataset.save(table)

    pd.testing.assert_frame_equal(dataset.load(), table)
    assert dataset.preview(nrows=1)["data"] == [["photo", 0.8]]
    run = mlflow.MlflowClient().get_run(logged.info.run_id)
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "ood_evaluation/table.json", "type": "table"}
    ]
    shown = mlflow.artifacts.load_dict(f"runs:/{logged.info.run_id}/ood_evaluation/table.json")
    assert shown == {"columns": ["domain", "student_top1"], "data": [["photo", 0.8], ["night", None]]}
    assert mlflow.MlflowClient().list_artifacts(untracked.info.run_id) == []


def test_metrics_are_logged_under_their_section_with_their_steps(tmp_path: Path) -> None:
    import mlflow

    from clip_dfkd.datasets import MlflowMetricsDataset

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("metrics", artifact_location=(tmp_path / "artifacts").as_uri())
    dataset = MlflowMetricsDataset(prefix="few_shot/training")
    # A mean of four top-1 fractions in floating point, as summed in one order.
    average = (0.76 + 0.68 + 0.84 + 0.53) / 4
    assert repr(average) == "0.7024999999999999"
    history = {
        "total_loss": [{"value": 0.9, "step": 0}, {"value": 0.4, "step": 1}],
        "seconds": {"value": 3, "step": 0},
        "average": {"value": average, "step": 0},
    }

    with pytest.raises(DatasetError, match=r"^metrics few_shot/training/\*: no active MLflow run"):
        dataset.save(history)
    with mlflow.start_run(experiment_id=experiment) as logged:
        assert not dataset.exists()
        dataset.save(history)
        assert dataset.exists()
        assert dataset.load() == {
            "total_loss": [{"value": 0.9, "step": 0}, {"value": 0.4, "step": 1}],
            "seconds": [{"value": 3.0, "step": 0}],
            "average": [{"value": 0.7025, "step": 0}],  # shown in MLflow without float noise
        }
    with mlflow.start_run(experiment_id=experiment) as untracked:
        dataset._logging_activated = False  # as kedro-mlflow switches off a pipeline it does not track
        dataset.save(history)

    client = mlflow.MlflowClient()
    assert sorted(client.get_run(logged.info.run_id).data.metrics) == [
        "few_shot/training/average",
        "few_shot/training/seconds",
        "few_shot/training/total_loss",
    ]
    assert [
        (m.step, m.value) for m in client.get_metric_history(logged.info.run_id, "few_shot/training/total_loss")
    ] == [
        (0, 0.9),
        (1, 0.4),
    ]
    assert client.get_run(untracked.info.run_id).data.metrics == {}


class _WaitsForTheNextLoader(AbstractDataset[str, str]):
    """Finishes writing a partition only once the loader of a later partition has run: a
    save that writes in the loaders' thread, between loaders, never gets there."""

    next_loader_ran = threading.Event()

    def __init__(self, filepath: str) -> None:
        self._filepath = filepath

    def load(self) -> str:
        raise AssertionError("never loaded")

    def save(self, data: str) -> None:
        if not self.next_loader_ran.wait(timeout=20):
            raise TimeoutError("the next partition was never produced while this one was written")
        path = Path(self._filepath.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}


def test_partitions_are_written_while_the_next_one_is_produced(tmp_path: Path) -> None:
    _WaitsForTheNextLoader.next_loader_ran.clear()

    def second() -> str:
        _WaitsForTheNextLoader.next_loader_ran.set()
        return "two"

    dataset = ResumablePartitionedDataset(path=str(tmp_path), dataset=_WaitsForTheNextLoader, filename_suffix=".txt")
    dataset.save({"a/1": lambda: "one", "a/2": second})

    assert _files(tmp_path) == {"a/1.txt": "one", "a/2.txt": "two"}


def test_a_failed_write_fails_the_save_and_leaves_no_complete_file(tmp_path: Path) -> None:
    calls: list[str] = []
    dataset = _text(tmp_path, _DiesMidWrite)
    (tmp_path / "a").mkdir()

    with pytest.raises(DatasetError, match="disk died"):
        dataset.save({f"a/{n}": _lazy(calls, f"a/{n}", "text") for n in range(40)})

    assert not list(tmp_path.rglob("*.txt"))  # no complete file, and no partial one left behind
    assert len(calls) < 40  # stopped early, not after producing everything


class _CountsBuilds(AbstractDataset[str, str]):
    """A text file that records every time a dataset of it is built."""

    built: list[str] = []

    def __init__(self, filepath: str) -> None:
        _CountsBuilds.built.append(filepath)
        self._filepath = filepath

    def load(self) -> str:
        return Path(self._filepath).read_text()

    def save(self, data: str) -> None:
        raise AssertionError("never saved")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}


def test_loading_lists_partitions_without_building_their_datasets(tmp_path: Path) -> None:
    """Listing 10⁶ images must not build 10⁶ Kedro datasets in the listing process: a
    partition's dataset is built by its loader, in whichever process calls it."""
    import pickle

    _text(tmp_path).save({f"class/{n}": f"text {n}" for n in range(5)})
    dataset = _text(tmp_path, _CountsBuilds)
    _CountsBuilds.built.clear()

    loaders = dataset.load()
    assert dataset.exists()
    assert sorted(loaders) == [f"class/{n}" for n in range(5)] and _CountsBuilds.built == []
    shipped = pickle.loads(pickle.dumps(loaders["class/3"]))  # as to a DataLoader worker started by spawn
    assert shipped() == "text 3" and _CountsBuilds.built == [str(tmp_path / "class/3.txt")]
    assert str(shipped) == str(tmp_path / "class/3.txt")  # how a log line names it


def _images_of_every_mode() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    return {
        "rgb": rgb,
        "rgba": Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)),
        "gray": rgb.convert("L"),
        "gray16": Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)),
        "palette": palette,
    }


@pytest.mark.parametrize("protocol", ["", "memory://"])
def test_image_partitions_load_as_the_pillow_dataset_loads_them_without_building_it(
    tmp_path: Path, protocol: str, monkeypatch
) -> None:
    """The labelling and training stages read every image every epoch: a Kedro dataset per
    image (~0.18 ms) cost more than decoding a 32 px PNG. The loader reads the file as
    pillow.ImageDataset does (same pixels, mode and PNG info, file closed) without one."""
    import os
    import pickle

    import fsspec
    from kedro_datasets.pillow import ImageDataset

    path = f"{protocol}{tmp_path}/images" if protocol else str(tmp_path / "images")
    dataset = ResumablePartitionedDataset(path=path, dataset="pillow.ImageDataset", filename_suffix=".png")
    images = _images_of_every_mode()
    dataset.save(images)
    # An animated PNG (the dataset saves first frames only): Pillow keeps such a file open after decoding.
    with fsspec.open(f"{path}/animated.png", "wb") as file:
        images["rgb"].save(file, format="PNG", save_all=True, append_images=[images["gray"].convert("RGB")])
    expected = {name: ImageDataset(filepath=f"{path}/{name}.png").load() for name in [*images, "animated"]}

    monkeypatch.setattr(ImageDataset, "load", lambda self: pytest.fail("a pillow.ImageDataset was built per image"))
    open_files = len(os.listdir("/proc/self/fd"))
    loaded = {name: pickle.loads(pickle.dumps(loader))() for name, loader in dataset.load().items()}
    assert len(os.listdir("/proc/self/fd")) == open_files

    assert sorted(loaded) == sorted(expected)
    for name, image in loaded.items():
        assert (image.mode, image.size, image.info) == (expected[name].mode, expected[name].size, expected[name].info)
        assert np.array_equal(np.asarray(image), np.asarray(expected[name])), name
    assert str(dataset.load()["rgb"]) == f"{path}/rgb.png"  # how a log line names it


def test_image_partitions_with_filesystem_arguments_are_loaded_through_their_dataset(tmp_path: Path) -> None:
    dataset = ResumablePartitionedDataset(
        path=str(tmp_path), dataset={"type": "pillow.ImageDataset", "fs_args": {}}, filename_suffix=".png"
    )
    dataset.save({"rgb": _images_of_every_mode()["rgb"]})
    loader = dataset.load()["rgb"]
    assert type(loader).__name__ == "PartitionLoader" and loader().mode == "RGB"


def _fills_the_disk(code: int = errno.ENOSPC):
    """A stand-in for ``Image.save(fp, ...)`` or ``save_file(tensors, filename, ...)`` that
    gets a few bytes out, then finds the disk full."""

    def write(data: Any, destination: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(destination, str | Path):
            Path(destination).write_bytes(b"\x89PNG\r\n")
        else:
            destination.write(b"\x89PNG\r\n")
        raise OSError(code, os.strerror(code))

    return write


def _twelve_megabytes_free(monkeypatch) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=12_000_000))


def test_a_full_disk_stops_the_image_save_with_one_line_and_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    """As synthesis saves its images: the first write that finds no space ends the save with
    the file and the space left, and no ``.partial.png`` stays behind."""
    _twelve_megabytes_free(monkeypatch)
    monkeypatch.setattr(Image.Image, "save", _fills_the_disk())
    rendered: list[str] = []
    dataset = ResumablePartitionedDataset(path=str(tmp_path), dataset="pillow.ImageDataset", filename_suffix=".png")

    with pytest.raises(DatasetError) as caught:  # Kedro wraps every dataset's save error
        dataset.save({f"ball/{n}": _lazy(rendered, f"ball/{n}", Image.new("RGB", (4, 4))) for n in range(40)})

    message = user_error_message(caught.value)  # what `kedro run` prints, on one line
    assert isinstance(caught.value.__cause__, OutOfSpaceError)
    assert re.fullmatch(
        rf"{tmp_path}/ball/\d+\.png: no space left on device \(12\.0 MB free on /\S*\); "
        "free some space there or point the output elsewhere",
        message,
    ), message
    assert list(tmp_path.rglob("*.*")) == []
    assert len(rendered) < 40


def _save_a_style_bank(destination: Path, monkeypatch, code: int) -> None:
    """As a file output is written, through atomic_file (the teacher cache and ONNX exports too)."""
    import torch

    from clip_dfkd import styles

    monkeypatch.setattr(styles, "save_file", _fills_the_disk(code))
    styles.StyleBank("contrastive", "teacher", torch.zeros(2, 4)).save(destination)


def _save_a_model_folder(destination: Path, monkeypatch, code: int) -> None:
    """As the student's folder is written, through atomic_directory."""
    from clip_dfkd.atomic import atomic_directory

    with atomic_directory(destination) as staging:
        (staging / "config.json").write_text("{}")
        _fills_the_disk(code)(None, staging / "model.safetensors")


@pytest.mark.parametrize(
    ("write", "code", "reason"),
    [
        (_save_a_style_bank, errno.ENOSPC, "no space left on device"),
        (_save_a_style_bank, errno.EDQUOT, "disk quota exceeded"),
        (_save_a_model_folder, errno.ENOSPC, "no space left on device"),
    ],
    ids=["file-disk-full", "file-quota", "folder-disk-full"],
)
def test_a_full_disk_stops_an_atomic_write_with_one_line_and_nothing_left(
    tmp_path: Path, monkeypatch, write, code: int, reason: str
) -> None:
    _twelve_megabytes_free(monkeypatch)
    destination = tmp_path / "outputs" / "output.safetensors"

    with pytest.raises(OutOfSpaceError) as caught:
        write(destination, monkeypatch, code)

    assert re.fullmatch(
        rf"{destination}: {reason} \(12\.0 MB free on /\S*\); free some space there or point the output elsewhere",
        str(caught.value),
    ), str(caught.value)
    assert list((tmp_path / "outputs").iterdir()) == []


def _parquet_fills_the_disk(table: Any, file: Any, *args: Any, **kwargs: Any) -> None:
    """A stand-in for ``pyarrow.parquet.write_table(table, file)`` as the project's Parquet
    dataset calls it, on its staging file: a few bytes out, then the disk is full (the bare
    OSError, without a file name)."""
    file.write(b"PAR1")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# Both written by the project, to a sibling renamed when whole; the prompt table fails after
# the style bank was saved whole.
@pytest.mark.parametrize(
    ("output", "kept"), [("style_bank.safetensors", []), ("prompt_table.parquet", ["style_bank.safetensors"])]
)
def test_a_full_disk_during_a_run_ends_it_failed_with_one_line(fresh_project: Path, monkeypatch, output, kept) -> None:
    """Through Kedro as `kedro run` meets it: the node's output save fails inside Kedro's
    dataset wrapper and runner, the command line finds the one line, kedro-mlflow marks the
    run FAILED and nothing of the output stays: no staging file beside it, no cut-short file
    under its name."""
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from clip_dfkd import styles

    monkeypatch.chdir(fresh_project)
    _twelve_megabytes_free(monkeypatch)
    if output == "style_bank.safetensors":
        monkeypatch.setattr(styles, "save_file", _fills_the_disk())
    else:
        monkeypatch.setattr(pyarrow.parquet, "write_table", _parquet_fills_the_disk)
    bootstrap_project(fresh_project)

    with (
        KedroSession.create(project_path=fresh_project, env="demo") as session,
        pytest.raises(Exception) as caught,
    ):
        session.run(pipeline_names=["prompt_generation"])

    written = fresh_project / "data/02_intermediate" / output
    assert re.fullmatch(
        rf"{written}: no space left on device \(12\.0 MB free on /\S*\); free some space there or point the output "
        "elsewhere",
        user_error_message(caught.value) or "",
    ), caught.value
    assert sorted(path.name for path in (fresh_project / "data/02_intermediate").iterdir()) == kept
    client = mlflow.MlflowClient(f"sqlite:///{fresh_project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_a_table_keeps_its_class_list_in_the_parquet_footer(tmp_path) -> None:
    """Saved under the project's key and read from the footer alone; a table saved before (by
    pandas, which keeps DataFrame.attrs under its own key) still tells its classes."""
    import json

    import pyarrow.parquet as pq

    from clip_dfkd.datasets import CLASSES_KEY, ParquetDataset

    table = pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1]})
    table.attrs["classes"] = ["tent", "ball"]
    ours = ParquetDataset(filepath=str(tmp_path / "ours.parquet"))
    ours.save(table)
    table.to_parquet(tmp_path / "older.parquet")

    footer = pq.read_schema(tmp_path / "ours.parquet").metadata
    assert json.loads(footer[CLASSES_KEY]) == ["tent", "ball"] and b"PANDAS_ATTRS" not in footer
    assert ours.class_list() == ours.load().attrs["classes"] == ["tent", "ball"]
    assert ParquetDataset(filepath=str(tmp_path / "older.parquet")).class_list() == ["tent", "ball"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["older.parquet", "ours.parquet"]  # no staging file left
