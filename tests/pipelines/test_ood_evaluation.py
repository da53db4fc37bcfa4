from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import torch
from kedro.validation import ParameterValidationError
from metric_names import undocumented
from PIL import Image

from clip_dfkd.benchmarks import BenchmarkError, scan_benchmark
from clip_dfkd.models import StudentClassifier
from clip_dfkd.models.student import create_student, student_fingerprint
from clip_dfkd.params import (
    BenchmarkParams,
    ClassNames,
    InvalidParameterError,
    OodEvaluationParams,
    RuntimeParams,
    StudentParams,
    TeacherParams,
)
from clip_dfkd.pipelines.ood_evaluation.few_shot import FewShotError, draw_few_shot
from clip_dfkd.pipelines.ood_evaluation.plots import plot_confusion_matrices, plot_domain_accuracy
from clip_dfkd.pipelines.ood_evaluation.scoring import (
    index_benchmarks,
    per_class_accuracy,
    predict_student,
    predict_teacher,
    score_domains,
    summarise_evaluation,
)
from clip_dfkd.preflight import PreflightError, PreflightHook
from clip_dfkd.promotion import describe_evaluated_student, promote_student
from clip_dfkd.runtime import Runtime
from clip_dfkd.teacher_cache import TeacherOutputCache

CLASSES = ["ball", "box", "tent"]


def _benchmark(root, layout: dict[str, dict[str, int]]):
    for domain, counts in layout.items():
        (root / domain).mkdir(parents=True)
        for class_name, count in counts.items():
            folder = root / domain / class_name
            folder.mkdir()
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return root


def test_scan_lists_domains_and_matches_class_folders_loosely(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"Ball": 2, "tent": 1}, "sketch": {"box": 3}})
    domains = scan_benchmark("toy", BenchmarkParams(root=str(root)), ["ball", "box", "tent"])

    assert [d.domain for d in domains] == ["photo", "sketch"]
    assert domains[0].labels == [0, 0, 2]
    assert domains[1].labels == [1, 1, 1]


@pytest.mark.parametrize(
    ("layout", "params", "message"),
    [
        (
            {},
            {"root": "missing"},
            r"ood_evaluation\.benchmarks\.toy\.root='.*missing': no such folder; "
            r"expected the layout <root>/<domain>/<class>/<image files>",
        ),
        (
            {"photo": {"giraffe": 1}},
            {},
            r"ood_evaluation\.benchmarks\.toy: class folder 'giraffe' \(in photo\) is not in classes; "
            r"allowed: \['ball', 'box', 'tent'\]",
        ),
        (
            {"photo": {"ball": 1}, "sketch": {}},
            {},
            r"ood_evaluation\.benchmarks\.toy\.root='.*bench': the domain folders \['sketch'\] hold no class folder; "
            r"expected the layout <root>/<domain>/<class>/<image files>$",
        ),
        (
            {"photo": {}, "sketch": {}},
            {},
            r"ood_evaluation\.benchmarks\.toy\.root='.*bench': the domain folders \['photo', 'sketch'\] hold no "
            r"class folder",
        ),
        (
            {"photo": {"ball": 1}},
            {"domains": ["clipart"]},
            r"ood_evaluation\.benchmarks\.toy\.domains=\['clipart'\]: not folders of .*; allowed: \['photo'\]",
        ),
    ],
)
def test_bad_benchmarks_fail_on_one_line(tmp_path, layout, params, message) -> None:
    root = _benchmark(tmp_path / "bench", layout) if layout else tmp_path
    settings = {"root": str(root / params.pop("root")) if "root" in params else str(root), **params}
    with pytest.raises(BenchmarkError, match=message) as caught:
        scan_benchmark("toy", BenchmarkParams.model_validate(settings), CLASSES)
    assert "\n" not in str(caught.value)


def test_scan_reads_class_folders_recursively(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 1, "tent": 1}})
    (root / "photo" / "ball" / "outdoor" / "sunny").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "photo" / "ball" / "outdoor" / "sunny" / "deep.jpg")
    Image.new("RGB", (8, 8)).save(root / "photo" / "ball" / "outdoor" / "near.PNG")

    (photo,) = scan_benchmark("toy", BenchmarkParams(root=str(root)), CLASSES)

    relative = [str(p.relative_to(root / "photo")) for p in photo.paths]
    assert relative == ["ball/0.png", "ball/outdoor/near.PNG", "ball/outdoor/sunny/deep.jpg", "tent/0.png"]
    assert photo.labels == [0, 0, 0, 2]
    assert photo.skipped == []


def test_scan_ignores_hidden_files_and_folders(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 1}})
    ball = root / "photo" / "ball"
    (ball / ".DS_Store").write_bytes(b"finder")
    Image.new("RGB", (8, 8)).save(ball / ".hidden.png")
    (ball / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(ball / ".ipynb_checkpoints" / "copy.png")
    (root / "photo" / ".thumbnails").mkdir()  # not a class, yet no error: hidden
    (root / "photo" / "._photo").write_bytes(b"AppleDouble")
    (root / ".cache").mkdir()  # not a domain

    (photo,) = scan_benchmark("toy", BenchmarkParams(root=str(root)), CLASSES)

    assert [p.name for p in photo.paths] == ["0.png"]
    assert photo.skipped == []


def test_scan_lists_stray_files_as_skipped_with_a_reason(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 1}})
    (root / "photo" / "ball" / "labels.txt").write_text("ball")
    (root / "photo" / "ball" / "raw").mkdir()
    (root / "photo" / "ball" / "raw" / "scan.pdf").write_bytes(b"%PDF")
    Image.new("RGB", (8, 8)).save(root / "photo" / "unsorted.png")

    (photo,) = scan_benchmark("toy", BenchmarkParams(root=str(root)), CLASSES)

    assert [p.name for p in photo.paths] == ["0.png"]
    assert [(str(p.relative_to(root)), reason) for p, reason in photo.skipped] == [
        ("photo/unsorted.png", "not inside a class folder"),
        ("photo/ball/labels.txt", "not an image file"),
        ("photo/ball/raw/scan.pdf", "not an image file"),
    ]


def test_files_at_the_root_are_listed_as_skipped_without_a_domain(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 1}})
    (root / "README.txt").write_text("toy benchmark")
    (root / "fetch.sh").write_text("wget ...")

    _, skipped = index_benchmarks(ClassNames.model_validate(CLASSES), _params({"toy": {"root": str(root)}}))

    assert skipped.values.tolist() == [
        ["toy", "", str(root / "README.txt"), "at the benchmark's root, not a domain folder"],
        ["toy", "", str(root / "fetch.sh"), "at the benchmark's root, not a domain folder"],
    ]


def test_scan_follows_folder_links_once_and_never_loops(tmp_path) -> None:
    root = _benchmark(tmp_path / "bench", {"photo": {"ball": 1}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "linked.png")
    (root / "photo" / "ball" / "more").symlink_to(elsewhere, target_is_directory=True)
    (root / "photo" / "ball" / "loop").symlink_to(root / "photo" / "ball", target_is_directory=True)

    (photo,) = scan_benchmark("toy", BenchmarkParams(root=str(root)), CLASSES)

    assert [str(p.relative_to(root / "photo" / "ball")) for p in photo.paths] == ["0.png", "more/linked.png"]


class _ConstantStudent(torch.nn.Module):
    """Always predicts ``index``; enough to check the bookkeeping."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, pixels):
        logits = torch.zeros(len(pixels), 3)
        logits[:, self.index] = 1
        return logits

    def eval_transform(self):
        import torchvision.transforms.v2 as T

        return T.Compose([T.ToImage(), T.Resize((8, 8)), T.ToDtype(torch.float32, scale=True)])


class _ConstantTeacher:
    """Always predicts ``index``; counts the times it is loaded and the images it classifies."""

    def __init__(self, index: int):
        self.index = index
        self.preprocess = _ConstantStudent(0).eval_transform()
        self.runtime = Runtime(torch.device("cpu"), torch.float32)
        self.loads = 0
        self.classified = 0

    def zero_shot_weights(self, class_names, templates):
        return None

    def classify(self, pixels, head):
        self.classified += len(pixels)
        logits = torch.zeros(len(pixels), 3)
        logits[:, self.index] = 1
        return logits, None


def _loaded_as(teacher: _ConstantTeacher):
    """While active, the evaluation's nodes load ``teacher`` as their teacher."""

    def load(params, runtime):
        teacher.loads += 1
        return teacher

    return mock.patch("clip_dfkd.models.teacher.load_teacher", load)


TEACHER = TeacherParams.model_construct(
    model_name="constant", pretrained="none", templates=["a photo of a {class_name}."], batch_size=2
)


def _evaluate(
    params: OodEvaluationParams,
    cache: TeacherOutputCache | None = None,
    teacher: _ConstantTeacher | None = None,
    teacher_params: TeacherParams = TEACHER,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The evaluation's nodes in the pipeline's order, with constant models."""
    classes = ClassNames.model_validate(CLASSES)
    index, listed_skips = index_benchmarks(classes, params)
    with tempfile.TemporaryDirectory() as scratch, _loaded_as(teacher or _ConstantTeacher(2)):
        teacher_predictions = predict_teacher(
            index,
            classes,
            teacher_params,
            params,
            RuntimeParams(device="cpu"),
            cache or TeacherOutputCache(Path(scratch)),
        )
    student_predictions = predict_student(index, _ConstantStudent(0), params, RuntimeParams(device="cpu"))
    # k = 0: the few-shot nodes pass nothing on.
    _, few_shot_index = draw_few_shot(index, classes, params)
    few_shot_predictions = predict_student(few_shot_index, _ConstantStudent(0), params, RuntimeParams(device="cpu"))
    return score_domains(
        index,
        listed_skips,
        teacher_predictions,
        student_predictions,
        few_shot_index,
        few_shot_predictions,
        classes,
        params,
    )


def _params(benchmarks: dict) -> OodEvaluationParams:
    return OodEvaluationParams.model_validate({"benchmarks": benchmarks, "batch_size": 2})


def test_accuracy_agreement_and_corrupt_files_are_counted_per_domain(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 3, "box": 1}, "sketch": {"ball": 1, "tent": 3}})
    (root / "sketch" / "tent" / "broken.png").write_bytes(b"not an image")

    params = _params({"toy": {"root": str(root)}})
    results, _, predictions = _evaluate(params)

    # One prediction row per readable image, with class names, for the per-image record.
    assert len(predictions) == 8 and not predictions["path"].str.endswith("broken.png").any()
    assert set(predictions["student_prediction"]) == {CLASSES[0]} and set(predictions["teacher_prediction"]) == {
        CLASSES[2]
    }
    assert predictions.groupby("domain")["class_name"].apply(sorted).to_dict() == {
        "photo": ["ball", "ball", "ball", "box"],
        "sketch": ["ball", "tent", "tent", "tent"],
    }
    photo, sketch = results.iloc[0], results.iloc[1]
    assert (photo.images, photo.corrupt_images, photo.student_top1, photo.teacher_top1, photo.agreement) == (
        4,
        0,
        0.75,
        0.0,
        0.0,
    )
    assert (sketch.images, sketch.corrupt_images, sketch.student_top1, sketch.teacher_top1) == (4, 1, 0.25, 0.75)

    table, markdown, metrics, few_shot_metrics = summarise_evaluation(results, params)
    average = table[table.domain == "average"].iloc[0]
    assert average.student_top1 == pytest.approx(0.5)
    assert average.teacher_top1 == pytest.approx(0.375)
    assert average.corrupt_images == 1
    assert (average.domains, average.note) == (2, "mean over 2 of 2 domains")
    assert "| toy" in markdown and "average" in markdown
    # Every row names the folder its benchmark was read from, absolute (comparison and promotion key on it).
    assert list(table.columns[:3]) == ["setting", "benchmark", "root"] and set(table["root"]) == {str(root.resolve())}
    assert f"Benchmark folders: toy `{root.resolve()}`" in markdown
    assert metrics["toy/sketch/corrupt_images"] == {"value": 1.0, "step": 0}
    assert metrics["toy/average/student_top1"]["value"] == pytest.approx(0.5)
    assert few_shot_metrics == {}
    figure = plot_domain_accuracy(results)
    assert len(figure.axes[0].patches) == 4  # student and teacher bars for two domains


def test_unreadable_and_stray_files_are_reported_one_row_each(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 2}})
    ball = root / "photo" / "ball"
    Image.effect_noise((64, 64), 40).save(ball / "whole.png")
    (ball / "truncated.png").write_bytes((ball / "whole.png").read_bytes()[:2000])
    (ball / "whole.png").unlink()
    (ball / "empty.jpg").touch()
    (ball / "fake.png").write_text("<html>not found</html>")
    (ball / "notes.txt").write_text("ball")

    results, skipped, _ = _evaluate(_params({"toy": {"root": str(root)}}))

    assert list(skipped.columns) == ["benchmark", "domain", "path", "reason"]
    reasons = {row.path.removeprefix(f"{ball}/"): row.reason for row in skipped.itertuples()}
    assert set(skipped["benchmark"]) == {"toy"} and set(skipped["domain"]) == {"photo"}
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["truncated.png"].startswith("OSError: image file is truncated")
    assert reasons["empty.jpg"].startswith("UnidentifiedImageError: cannot identify image file")
    assert reasons["fake.png"].startswith("UnidentifiedImageError: cannot identify image file")
    assert len(reasons) == 4 and all("\n" not in reason for reason in reasons.values())
    assert (results.iloc[0].images, results.iloc[0].corrupt_images) == (2, 3)


def test_nothing_skipped_is_an_empty_table_with_its_header(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 1}})

    _, skipped, _ = _evaluate(_params({"toy": {"root": str(root)}}))

    skipped.to_csv(tmp_path / "skipped.csv", index=False)
    assert (tmp_path / "skipped.csv").read_text().strip() == "benchmark,domain,path,reason"


def test_a_domain_without_readable_images_is_warned_and_left_out_of_the_average(tmp_path, caplog) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 2}, "sketch": {"tent": 2}, "clipart": {"box": 0}})
    (root / "clipart" / "box" / "broken.png").write_bytes(b"")

    params = _params({"toy": {"root": str(root)}})
    with caplog.at_level(logging.WARNING, logger="clip_dfkd.pipelines.ood_evaluation.scoring"):
        results, _, _ = _evaluate(params)

    assert "toy/clipart: no readable image (1 image files, 0 other files)" in caplog.text
    clipart = results[results.domain == "clipart"].iloc[0]
    assert (clipart.images, clipart.note) == (0, "no readable image")
    assert math.isnan(clipart.student_top1) and math.isnan(clipart.agreement)

    table, markdown, metrics, _ = summarise_evaluation(results, params)
    average = table[table.domain == "average"].iloc[0]
    assert (average.domains, average.note) == (2, "mean over 2 of 3 domains")
    assert average.student_top1 == pytest.approx(0.5)  # (1.0 + 0.0) / 2, not / 3
    assert table[table.domain == "clipart"].iloc[0].domains == 0
    assert "mean over 2 of 3 domains" in markdown and "no readable image" in markdown
    assert "toy/clipart/student_top1" not in metrics
    assert metrics["toy/clipart/corrupt_images"]["value"] == 1.0
    figure = plot_domain_accuracy(results)
    assert "clipart\n(no readable image)" in [t.get_text() for t in figure.axes[0].get_xticklabels()]


def test_a_disabled_benchmark_is_neither_checked_nor_evaluated(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 1}})
    params = _params({"toy": {"root": str(root)}, "gone": {"root": str(tmp_path / "missing"), "enabled": False}})

    results, _, _ = _evaluate(params)
    assert set(results["benchmark"]) == {"toy"}

    _preflight(params)  # no error: "gone" is off
    enabled = _params({"toy": {"root": str(root)}, "gone": {"root": str(tmp_path / "missing")}})
    with pytest.raises(PreflightError, match=r"ood_evaluation\.benchmarks\.gone\.root=.*: no such folder"):
        _preflight(enabled)


def _preflight(params: OodEvaluationParams) -> None:
    """The preflight hook on a pipeline that evaluates with ``params`` (what it reads of the
    catalog: the classes and the evaluation's parameters)."""

    class Catalog:
        def load(self, name):
            return {"params:classes": ClassNames.model_validate(CLASSES), "params:ood_evaluation": params}[name]

    class OodPipeline:
        def inputs(self):
            return {"params:classes", "params:ood_evaluation"}

        def all_outputs(self):
            return set()

    PreflightHook().before_pipeline_run({}, OodPipeline(), Catalog())


def test_at_least_one_benchmark_stays_enabled() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        _params({"pacs": {"root": "a", "enabled": False}, "vlcs": {"root": "b", "enabled": False}})

    assert str(caught.value) == (
        "ood_evaluation.benchmarks={'pacs': {'enabled': False}, 'vlcs': {'enabled': False}}: every benchmark is "
        "disabled; allowed: at least one benchmark with enabled: true"
    )


def _student() -> StudentClassifier:
    torch.manual_seed(0)
    return create_student(StudentParams(model_name="test_resnet", image_size=32), CLASSES)


def test_the_fingerprint_follows_the_weights_not_the_object(tmp_path) -> None:
    student = _student()
    student.save_pretrained(tmp_path / "student")
    reloaded = StudentClassifier.from_pretrained(tmp_path / "student")

    fingerprint = student_fingerprint(student)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert student_fingerprint(reloaded) == fingerprint
    with torch.no_grad():
        next(reloaded.parameters()).view(-1)[0] += 1e-3
    assert student_fingerprint(reloaded) != fingerprint


def test_the_evaluated_student_names_its_registration_only_when_the_fingerprint_matches() -> None:
    student = _student()
    registration = {
        "name": "clip-dfkd-student",
        "version": "3",
        "alias": "candidate",
        "uri": "models:/clip-dfkd-student@candidate",
        "run_id": "abc123",
    }

    matched = describe_evaluated_student(student, {**registration, "fingerprint": student_fingerprint(student)})
    assert matched == {
        "config": student.config,
        "fingerprint": student_fingerprint(student),
        "registered_model": "clip-dfkd-student",
        "version": "3",
        "run_id": "abc123",
        "reason": None,
    }
    json.dumps(matched)  # saved by json.JSONDataset

    other = describe_evaluated_student(student, {**registration, "fingerprint": "0123456789abcdef"})
    assert (other["registered_model"], other["version"], other["run_id"]) == (None, None, None)
    assert "is for a student with fingerprint 0123456789abcdef, not the evaluated" in other["reason"]

    unmarked = describe_evaluated_student(student, registration)
    assert unmarked["registered_model"] is None
    assert "records no fingerprint" in unmarked["reason"]


def test_pipeline_reports_every_demo_domain(demo_project) -> None:
    import mlflow

    demo_project.run("ood_evaluation")

    reports = demo_project.path / "data/08_reporting"
    table = pd.read_csv(reports / "ood_evaluation.csv")
    assert table["domain"].tolist() == ["cartoon", "night", "photo", "sketch", "average"]
    assert (table["images"][:-1] == 100).all()  # 4 classes x 25 drawings per domain
    assert table[["student_top1", "teacher_top1", "agreement"]].apply(lambda c: c.between(0, 1)).all().all()
    assert table["note"].iloc[-1] == "mean over 4 of 4 domains"
    assert (reports / "ood_evaluation.md").read_text().startswith("# Out-of-distribution")
    assert (reports / "ood_accuracy.png").stat().st_size > 0
    assert (reports / "ood_skipped_files.csv").read_text().strip() == "benchmark,domain,path,reason"
    evaluated = json.loads((reports / "ood_evaluated_student.json").read_text())
    saved = json.loads((demo_project.path / "data/06_models/student/config.json").read_text())
    assert evaluated["config"] == saved
    assert len(evaluated["fingerprint"]) == 16
    mlflow.set_tracking_uri(f"sqlite:///{demo_project.path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("clip-dfkd-demo").experiment_id])
    logged = {a.path for run in runs for a in client.list_artifacts(run.info.run_id, "ood_evaluation")}
    assert {"ood_evaluation/ood_skipped_files.csv", "ood_evaluation/ood_evaluated_student.json"} <= logged


def test_switching_off_every_benchmark_fails_before_any_node(demo_project) -> None:
    off = {"ood_evaluation": {"benchmarks": {"demo_shapes": {"enabled": False}}}}
    with pytest.raises(
        ParameterValidationError, match=r"ood_evaluation\.benchmarks=\{'demo_shapes': \{'enabled': False"
    ):
        with demo_project.session(runtime_params=off) as session:
            session.run(pipeline_names=["ood_evaluation"])


def test_per_class_accuracy_ratio_and_confusion_matrices_from_known_predictions() -> None:
    predictions = pd.DataFrame(
        {
            "setting": ["data-free"] * 5,
            "benchmark": ["toy"] * 5,
            "domain": ["photo", "photo", "photo", "sketch", "sketch"],
            "path": list("abcde"),
            "class_name": ["ball", "ball", "tent", "ball", "box"],
            "student_prediction": ["ball", "tent", "tent", "box", "box"],
            "teacher_prediction": ["ball", "ball", "ball", "ball", "box"],
        }
    )

    per_class = (
        per_class_accuracy(predictions).set_index(["domain", "class_name"]).drop(columns=["setting", "benchmark"])
    )
    figure = plot_confusion_matrices(predictions, ClassNames.model_validate(CLASSES))

    assert per_class.loc[("photo", "ball")].tolist() == [2, 0.5, 1.0]
    assert per_class.loc[("photo", "tent")].tolist() == [1, 1.0, 0.0]
    assert per_class.loc[("sketch", "box")].tolist() == [1, 1.0, 1.0]
    student, teacher = figure.axes[0].images[0].get_array(), figure.axes[1].images[0].get_array()
    # Rows are true classes (ball, box, tent), normalised by their counts.
    assert student.tolist() == [[1 / 3, 1 / 3, 1 / 3], [0, 1, 0], [0, 0, 1]]
    assert teacher.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_the_student_teacher_ratio_per_domain_and_over_the_benchmark(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 3, "tent": 1}, "sketch": {"ball": 1, "tent": 3}})

    params = _params({"toy": {"root": str(root)}})
    results, _, _ = _evaluate(params)
    table, _, metrics, _ = summarise_evaluation(results, params)

    # The student always says ball, the teacher tent: photo 0.75 vs 0.25, sketch 0.25 vs 0.75.
    assert results["student_teacher_ratio"].tolist() == [3.0, pytest.approx(1 / 3)]
    assert table[table.domain == "average"].iloc[0].student_teacher_ratio == pytest.approx(1.0)
    assert metrics["toy/photo/student_teacher_ratio"]["value"] == 3.0


class BrightestChannelInLittleMemory(_ConstantStudent):
    """Predicts the brightest colour channel; more than ``fits`` images never fit."""

    def __init__(self, fits: int):
        super().__init__(0)
        self.fits = fits
        self.attempts = []

    def forward(self, pixels):
        self.attempts.append(len(pixels))
        if len(pixels) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return pixels.mean(dim=(2, 3))


def test_the_student_scores_only_the_readable_images_of_a_batch(tmp_path) -> None:
    paths = []
    for n, colour in enumerate([(250, 0, 0), None, (0, 0, 250), (0, 250, 0)]):
        path = tmp_path / f"{n}.png"
        if colour is None:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8), colour).save(path)
        paths.append(str(path))
    index = pd.DataFrame({"benchmark": "toy", "domain": "photo", "path": paths, "label": 0})
    student = BrightestChannelInLittleMemory(fits=4)
    params = OodEvaluationParams.model_validate({"benchmarks": {"toy": {"root": str(tmp_path)}}, "batch_size": 4})

    predictions = predict_student(index, student, params, RuntimeParams(device="cpu"))

    assert student.attempts == [3]  # the unreadable image's zero stand-in is not scored
    assert predictions["student_label"].tolist() == [0, -1, 2, 1]
    assert predictions["error"][1].startswith("UnidentifiedImageError") and set(predictions["error"][[0, 2, 3]]) == {""}


def test_a_scoring_batch_that_does_not_fit_is_scored_in_smaller_batches(tmp_path, caplog) -> None:
    from clip_dfkd.student_training import StudentOutOfMemoryError

    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    paths = []
    for n in range(7):
        Image.new("RGB", (8, 8), colours[n % 3]).save(tmp_path / f"{n}.png")
        paths.append(str(tmp_path / f"{n}.png"))
    index = pd.DataFrame({"benchmark": "toy", "domain": "photo", "path": paths, "label": [n % 3 for n in range(7)]})

    student = BrightestChannelInLittleMemory(fits=2)
    params = OodEvaluationParams.model_validate({"benchmarks": {"toy": {"root": str(tmp_path)}}, "batch_size": 6})
    with caplog.at_level(logging.WARNING, logger="clip_dfkd.pipelines.ood_evaluation.scoring"):
        predictions = predict_student(index, student, params, RuntimeParams(device="cpu"))

    # 6, then 3, did not fit; 2 at a time from then on (the 1s are what remained of a batch).
    assert student.attempts == [6, 3, 2, 1, 2, 1, 1]
    assert predictions["student_label"].tolist() == [n % 3 for n in range(7)]
    assert "student: 6 images at once do not fit in device memory; scoring 3 at a time" in caplog.text
    with pytest.raises(StudentOutOfMemoryError) as error:
        predict_student(index, BrightestChannelInLittleMemory(fits=0), params, RuntimeParams(device="cpu"))
    assert str(error.value) == (
        "ood_evaluation: out of device memory scoring a single image with the student in float32; "
        "set runtime.precision=bf16 (or fp16)"
    )


def test_a_second_evaluation_reads_the_teachers_outputs_from_the_cache(tmp_path) -> None:
    root = _benchmark(tmp_path / "bench", {"photo": {"ball": 2, "tent": 1}, "sketch": {"box": 2}})
    params = _params({"toy": {"root": str(root)}})
    cache = TeacherOutputCache(tmp_path / "cache")
    first_teacher, second_teacher = _ConstantTeacher(2), _ConstantTeacher(2)

    first = _evaluate(params, cache, first_teacher)
    second = _evaluate(params, cache, second_teacher)

    assert first_teacher.classified == 5 and second_teacher.classified == 0
    assert (first_teacher.loads, second_teacher.loads) == (1, 0)  # all cached: no teacher loaded
    for before, after in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(before, after)

    # A changed image invalidates its domain only; other templates invalidate everything.
    Image.new("RGB", (9, 9)).save(root / "sketch" / "box" / "0.png")
    third_teacher = _ConstantTeacher(2)
    _evaluate(params, cache, third_teacher)
    assert third_teacher.classified == 2
    fourth_teacher = _ConstantTeacher(2)
    other_templates = TEACHER.model_copy(update={"templates": ["a drawing of a {class_name}."]})
    _evaluate(params, cache, fourth_teacher, other_templates)
    assert fourth_teacher.classified == 5


# --- few-shot -------------------------------------------------------------------------


def _few_shot_params(root: Path, **few_shot) -> OodEvaluationParams:
    return OodEvaluationParams.model_validate(
        {
            "benchmarks": {"toy": {"root": str(root)}},
            "batch_size": 2,
            "few_shot": {"source_domains": {"toy": ["photo"]}, **few_shot},
        }
    )


def _real_paths(paths: pd.Series) -> set[str]:
    return {os.path.realpath(path) for path in paths}


def test_the_few_shot_split_never_puts_an_evaluation_image_into_training(tmp_path) -> None:
    root = _benchmark(
        tmp_path,
        {"photo": {"ball": 6, "box": 6, "tent": 6}, "sketch": {"ball": 2, "box": 2}, "cartoon": {"tent": 1}},
    )
    (root / "photo" / "ball" / "broken.png").write_bytes(b"")
    # The sketch domain also links to every photo of a ball, as re-packaged datasets can.
    for i in range(6):
        (root / "sketch" / "ball" / f"photo_{i}.png").symlink_to(root / "photo" / "ball" / f"{i}.png")
    classes = ClassNames.model_validate(CLASSES)
    params = _few_shot_params(root, k=3)
    index, _ = index_benchmarks(classes, params)

    shots, held_out = draw_few_shot(index, classes, params)

    assert shots.groupby("label").size().to_dict() == {0: 3, 1: 3, 2: 3}
    assert set(shots["domain"]) == {"photo"}
    assert set(held_out["domain"]) == {"sketch", "cartoon"}
    assert not set(shots["path"]) & set(held_out["path"])
    assert not _real_paths(shots["path"]) & _real_paths(held_out["path"])
    # The links to the three photos not drawn are still scored.
    assert held_out["path"].str.contains("photo_").sum() == 3
    # The same seed draws the same images; another seed others.
    pd.testing.assert_frame_equal(draw_few_shot(index, classes, params)[0], shots)
    assert set(draw_few_shot(index, classes, _few_shot_params(root, k=3, seed=1))[0]["path"]) != set(shots["path"])
    # Every readable image of a class when k is all of them; the unreadable one never.
    everything, _ = draw_few_shot(index, classes, _few_shot_params(root, k=6))
    assert len(everything) == 18 and not everything["path"].str.endswith("broken.png").any()


def test_a_few_shot_draw_the_benchmark_cannot_serve_fails_on_one_line(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 6, "box": 7, "tent": 7}, "sketch": {"ball": 1}})
    (root / "photo" / "ball" / "broken.png").write_bytes(b"")
    classes = ClassNames.model_validate(CLASSES)
    index, _ = index_benchmarks(classes, _params({"toy": {"root": str(root)}}))

    with pytest.raises(FewShotError) as caught:
        draw_few_shot(index, classes, _few_shot_params(root, k=7))
    assert str(caught.value) == (
        "ood_evaluation.few_shot.k=7: class 'ball' has 6 readable images in the source domains (toy/photo: 6), the "
        "fewest of any class; allowed: k <= 6, or more source domains"
    )
    with pytest.raises(FewShotError, match=r"source_domains.toy=\['painting'\]: \['painting'\] not evaluated"):
        draw_few_shot(index, classes, _few_shot_params(root, k=1, source_domains={"toy": ["painting"]}))
    with pytest.raises(FewShotError, match=r"leaves no evaluated domain to score the few-shot student on"):
        draw_few_shot(index, classes, _few_shot_params(root, k=1, source_domains={"toy": ["photo", "sketch"]}))
    shots, held_out = draw_few_shot(index, classes, _few_shot_params(root, k=0))
    assert shots.empty and held_out.empty


def test_a_few_shot_k_above_the_image_files_of_a_class_fails_before_the_run(tmp_path) -> None:
    root = _benchmark(
        tmp_path, {"photo": {"ball": 3, "box": 4}, "sketch": {"ball": 2, "tent": 5}, "cartoon": {"ball": 1}}
    )

    with pytest.raises(PreflightError) as too_many:
        _preflight(_few_shot_params(root, k=5, source_domains={"toy": ["photo", "sketch"]}))
    with pytest.raises(PreflightError) as absent:
        _preflight(_few_shot_params(root, k=1, source_domains={"toy": ["photo"]}))

    assert str(too_many.value) == (
        "ood_evaluation.few_shot.k=5: class 'box' has 4 image files in the source domains (toy/photo: 4, "
        "toy/sketch: 0), the fewest of any class; allowed: k <= 4, or more source domains"
    )
    assert str(absent.value) == (
        "ood_evaluation.few_shot.k=1: class 'tent' has no image files in the source domains toy/photo; allowed: "
        "ood_evaluation.few_shot.source_domains that hold k=1 image files of every class"
    )
    _preflight(_few_shot_params(root, k=4, source_domains={"toy": ["photo", "sketch"]}))


def test_the_report_says_which_setting_produced_each_row(tmp_path, monkeypatch) -> None:
    root = _benchmark(tmp_path / "bench", {"photo": {"ball": 2, "box": 2, "tent": 2}, "sketch": {"ball": 1, "tent": 3}})
    classes = ClassNames.model_validate(CLASSES)
    params = _few_shot_params(root, k=1)
    cpu = RuntimeParams(device="cpu")
    index, listed_skips = index_benchmarks(classes, params)
    with _loaded_as(_ConstantTeacher(2)):
        teacher = predict_teacher(index, classes, TEACHER, params, cpu, TeacherOutputCache(tmp_path / "cache"))
    _, held_out = draw_few_shot(index, classes, params)

    # The data-free student always says ball, the few-shot one tent, the teacher tent.
    results, _, predictions = score_domains(
        index,
        listed_skips,
        teacher,
        predict_student(index, _ConstantStudent(0), params, cpu),
        held_out,
        predict_student(held_out, _ConstantStudent(2), params, cpu),
        classes,
        params,
    )
    table, markdown, metrics, few_shot_metrics = summarise_evaluation(results, params)

    rows = table.set_index(["setting", "domain"])
    assert list(rows.index) == [
        ("data-free", "photo"),
        ("data-free", "sketch"),
        ("data-free", "average"),
        ("few-shot k=1", "sketch"),
        ("few-shot k=1", "average"),
    ]
    assert rows.loc[("data-free", "sketch"), "student_top1"] == 0.25
    assert rows.loc[("few-shot k=1", "sketch"), ["student_top1", "teacher_top1", "agreement"]].tolist() == [
        0.75,
        0.75,
        1.0,
    ]
    assert metrics["toy/sketch/student_top1"]["value"] == 0.25
    assert few_shot_metrics["toy/sketch/student_top1"]["value"] == 0.75
    assert "toy/photo/student_top1" not in few_shot_metrics  # photo gave the shots
    assert (
        "**few-shot k=1**: that student fine-tuned on 1 real images per class drawn with seed 0 from toy/photo "
        "(its classifier only, true class weight 1, teacher soft labels weight 1 at T = 4, 30 epochs); "
        "scored on the other domains only." in markdown
    )
    # Which layers moved is always said; the interpolation where it stopped short of the fine-tuned weights.
    _, markdown, _, _ = summarise_evaluation(results, _few_shot_params(root, k=1, layers="all", interpolation=0.5))
    assert (
        "(all its layers, true class weight 1, teacher soft labels weight 1 at T = 4, 30 epochs, weights 0.5 of "
        "the way to the fine-tuned ones); scored" in markdown
    )
    assert predictions.groupby("setting").size().to_dict() == {"data-free": 10, "few-shot k=1": 4}
    assert set(per_class_accuracy(predictions)["setting"]) == {"data-free", "few-shot k=1"}
    figure = plot_domain_accuracy(results)
    assert "photo\n(few-shot source)" in [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [
        "student (data-free)",
        "student (few-shot k=1)",
        "teacher (zero-shot)",
    ]
    # Only the data-free rows score the registered student.
    decided = {}
    monkeypatch.setattr(
        "clip_dfkd.promotion.promote_if_better",
        lambda student, scored, report, params: decided.setdefault("settings", set(scored["setting"])),
    )
    promote_student({}, table, markdown, params)
    assert decided["settings"] == {"data-free"}


def test_the_pipeline_scores_a_few_shot_student_next_to_the_data_free_one(demo_project) -> None:
    import mlflow

    demo_project.run("ood_evaluation")
    few_shot = {"k": 2, "source_domains": {"demo_shapes": ["photo"]}, "training": {"epochs": 2}}
    with demo_project.session(runtime_params={"ood_evaluation": {"few_shot": few_shot}}) as session:
        session.run(pipeline_names=["ood_evaluation"])
    run_id = mlflow.last_active_run().info.run_id

    reports = demo_project.path / "data/08_reporting"
    table = pd.read_csv(reports / "ood_evaluation.csv")
    assert table.loc[table["setting"] == "few-shot k=2", "domain"].tolist() == ["cartoon", "night", "sketch", "average"]
    assert table.loc[table["setting"] == "data-free", "domain"].tolist() == [
        "cartoon",
        "night",
        "photo",
        "sketch",
        "average",
    ]
    shots = pd.read_csv(demo_project.path / "data/07_model_output/few_shot_images.csv")
    assert len(shots) == 8 and set(shots["domain"]) == {"photo"}
    assert "**few-shot k=2**" in (reports / "ood_evaluation.md").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{demo_project.path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert undocumented(run.data.metrics) == [], "metric names outside docs/tracking.md's Metric names table"
    assert run.data.metrics["few_shot/demo_shapes/average/student_top1"] == pytest.approx(
        table.loc[(table["setting"] == "few-shot k=2") & (table["domain"] == "average"), "student_top1"].item()
    )
    assert [m.step for m in client.get_metric_history(run_id, "few_shot/training/total_loss")] == [0, 1]
    assert run.data.params["ood_evaluation.few_shot.k"] == "2"


def test_a_few_shot_source_domain_not_on_disk_fails_before_any_node(demo_project) -> None:
    few_shot = {"k": 2, "source_domains": {"demo_shapes": ["foto"]}}
    with pytest.raises(PreflightError) as caught:
        with demo_project.session(runtime_params={"ood_evaluation": {"few_shot": few_shot}}) as session:
            session.run(pipeline_names=["ood_evaluation"])

    assert (
        "ood_evaluation.few_shot.source_domains.demo_shapes=['foto']: ['foto'] not evaluated domains; "
        "allowed: ['cartoon', 'night', 'photo', 'sketch']"
    ) in str(caught.value).splitlines()


def test_interpolation_moves_the_weights_that_share_of_the_way_to_the_fine_tuned_ones() -> None:
    from clip_dfkd.models import create_student
    from clip_dfkd.params import StudentParams
    from clip_dfkd.pipelines.ood_evaluation.few_shot import interpolated

    torch.manual_seed(0)
    start = create_student(StudentParams(model_name="test_resnet", image_size=32), ["a", "b"], None)
    tuned = copy.deepcopy(start)
    with torch.no_grad():
        for value in tuned.state_dict().values():
            value.add_(1) if value.is_floating_point() else value.add_(5)
    expected = {name: value.clone() for name, value in tuned.state_dict().items()}

    assert interpolated(start, tuned, 1.0) is tuned
    mixed = interpolated(start, tuned, 0.25).state_dict()
    for name, value in start.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(mixed[name], value + 0.25)
        else:
            assert torch.equal(mixed[name], expected[name]), name
