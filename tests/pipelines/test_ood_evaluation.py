from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image

from clip_dfkd.benchmarks import BenchmarkError, scan_benchmark
from clip_dfkd.params import BenchmarkParams, ClassNames, OodEvaluationParams, RuntimeParams
from clip_dfkd.pipelines.ood_evaluation.nodes import evaluate_domains, plot_domain_accuracy, summarise_evaluation

CLASSES = ["ball", "box", "tent"]


def _benchmark(root, layout: dict[str, dict[str, int]]):
    for domain, counts in layout.items():
        for class_name, count in counts.items():
            folder = root / domain / class_name
            folder.mkdir(parents=True)
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
            r"ood_evaluation\.benchmarks\.toy: class folder photo/'giraffe' is not in classes; "
            r"allowed: \['ball', 'box', 'tent'\]",
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
    def __init__(self, index: int):
        self.index = index
        self.preprocess = _ConstantStudent(0).eval_transform()

    def classify(self, pixels, head):
        logits = torch.zeros(len(pixels), 3)
        logits[:, self.index] = 1
        return logits, None


def test_accuracy_agreement_and_corrupt_files_are_counted_per_domain(tmp_path) -> None:
    root = _benchmark(tmp_path, {"photo": {"ball": 3, "box": 1}, "sketch": {"ball": 1, "tent": 3}})
    (root / "sketch" / "tent" / "broken.png").write_bytes(b"not an image")
    params = OodEvaluationParams.model_validate({"benchmarks": {"toy": {"root": str(root)}}, "batch_size": 2})

    results = evaluate_domains(
        _ConstantStudent(0),
        _ConstantTeacher(2),
        None,
        ClassNames.model_validate(CLASSES),
        params,
        RuntimeParams(device="cpu"),
    )

    photo, sketch = results.iloc[0], results.iloc[1]
    assert (photo.images, photo.corrupt_images, photo.student_top1, photo.teacher_top1, photo.agreement) == (
        4,
        0,
        0.75,
        0.0,
        0.0,
    )
    assert (sketch.images, sketch.corrupt_images, sketch.student_top1, sketch.teacher_top1) == (4, 1, 0.25, 0.75)

    table, markdown, metrics = summarise_evaluation(results)
    average = table[table.domain == "average"].iloc[0]
    assert average.student_top1 == pytest.approx(0.5)
    assert average.teacher_top1 == pytest.approx(0.375)
    assert average.corrupt_images == 1
    assert "| toy" in markdown and "average" in markdown
    assert metrics["toy.sketch.corrupt_images"] == {"value": 1.0, "step": 0}
    assert metrics["toy.average.student_top1"]["value"] == pytest.approx(0.5)
    figure = plot_domain_accuracy(results)
    assert len(figure.axes[0].patches) == 4  # student and teacher bars for two domains


def test_pipeline_reports_every_demo_domain(demo_project) -> None:
    demo_project.run("ood_evaluation")

    table = pd.read_csv(demo_project.path / "data/08_reporting/ood_evaluation.csv")
    assert table["domain"].tolist() == ["cartoon", "night", "photo", "sketch", "average"]
    assert (table["images"][:-1] == 12).all()
    assert table[["student_top1", "teacher_top1", "agreement"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (demo_project.path / "data/08_reporting/ood_evaluation.md").read_text().startswith("# Out-of-distribution")
    assert (demo_project.path / "data/08_reporting/ood_accuracy.png").stat().st_size > 0
