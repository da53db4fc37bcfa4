"""``ood_evaluation`` (conf/base/parameters_ood_evaluation.yml)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from clip_dfkd.benchmark_layouts import LAYOUTS
from clip_dfkd.params.base import Params, bad_value
from clip_dfkd.params.student_distillation import AugmentationParams, TeacherTargets, TrainingParams

BenchmarkLayout = Literal[("folders", *LAYOUTS)]  # type: ignore[valid-type]


class BenchmarkParams(Params):
    """A benchmark folder: ``layout`` names a published benchmark's layout (docs/benchmarks.md)
    or ``folders``, ``<root>/<domain>/<class>/<image files>``. ``domains`` defaults to the
    benchmark's published ones (every domain folder for ``folders``); ``split: test`` reads the
    official test list where the benchmark has one, ``all`` every image; ``class_aliases``
    maps a benchmark folder or class word to a class of the run. ``enabled: false`` keeps the
    entry in the configuration but neither checks nor evaluates it."""

    root: str
    layout: BenchmarkLayout = "folders"
    domains: list[str] | None = None
    split: Literal["test", "all"] = "test"
    class_aliases: dict[str, str] = {}
    enabled: bool = True

    def resolved_root(self) -> str:
        """The folder ``root`` names, absolute and with links resolved: what an evaluation
        records, so that scores of two folders under one benchmark name are told apart."""
        return str(Path(self.root).expanduser().resolve())


class PromotionParams(Params):
    """The registry alias that moves only to a better student: the evaluated version takes
    ``alias`` when its ``metric`` averaged over ``benchmark``'s domains (null: the first
    enabled benchmark) beats the current holder's by more than ``min_improvement``, or when
    no version holds it yet; a holder it cannot be compared with (another class list, no such
    figure from the same benchmark folder) keeps it (clip_dfkd.promotion)."""

    alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    benchmark: str | None = Field(default=None, min_length=1)
    metric: Literal["student_top1", "agreement", "student_teacher_ratio"] = "student_top1"
    min_improvement: float = Field(default=0.0, ge=0.0)


# The evaluation setting of the distilled student as it is, having seen no real image.
DATA_FREE = "data-free"


class FewShotParams(Params):
    """The few-shot setting: ``k`` real images per class (0: data-free only), drawn with
    ``seed`` from ``source_domains`` (``{benchmark: [domain, ...]}``), fine-tune the distilled
    student against their true class (``label_weight``, cross-entropy) and the teacher's
    zero-shot logits on the view being trained on (``kd_weight``, T² · KL at ``temperature``;
    ``teacher_targets`` as in student_distillation); that student is
    scored on every other evaluated domain, next to the data-free one. ``layers``: train
    ``all`` of them or only the ``classifier`` (a linear probe); ``freeze_batch_norm`` keeps
    the batch-norm statistics the student learnt on the synthetic images; ``interpolation``
    moves the distilled weights only that share of the way to the fine-tuned ones (WiSE-FT,
    Wortsman et al. 2022: 1 is the fine-tuned student, smaller keeps more of what it knew
    of the other domains)."""

    k: int = Field(default=0, ge=0)
    source_domains: dict[str, list[str]] = {}
    seed: int = 0
    label_weight: float = Field(default=1.0, ge=0.0)
    kd_weight: float = Field(default=1.0, ge=0.0)
    temperature: PositiveFloat = 4.0
    # The classifier alone by default: fine-tuning every layer on one domain's shots pulls the
    # features towards that domain and away from the others (docs/few_shot.md).
    layers: Literal["all", "classifier"] = "classifier"
    freeze_batch_norm: bool = True
    training: TrainingParams = TrainingParams(epochs=30, batch_size=32, learning_rate=1e-4)
    augmentation: AugmentationParams = AugmentationParams()
    # stored_views labels views_per_image views of each few-shot image before fine-tuning.
    teacher_targets: TeacherTargets = "stored_views"
    views_per_image: PositiveInt = 8
    interpolation: float = Field(default=1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_signal(self) -> FewShotParams:
        if self.label_weight == 0 and self.kd_weight == 0:
            raise bad_value("label_weight", 0, "label_weight and kd_weight are both 0; allowed: at least one > 0")
        if self.k and not any(self.source_domains.values()):
            raise bad_value(
                "source_domains",
                self.source_domains,
                "k > 0 needs domains to draw from; allowed: {benchmark: [domain, ...]}, e.g. {pacs: [photo]}",
            )
        return self

    def describe(self) -> str:
        """The setting's name in reports: ``few-shot k=<k>``."""
        return f"few-shot k={self.k}"

    def source_names(self) -> list[str]:
        """The source domains as ``<benchmark>/<domain>``, in configuration order."""
        return [f"{benchmark}/{domain}" for benchmark, domains in self.source_domains.items() for domain in domains]


class OodEvaluationParams(Params):
    section: ClassVar[str] = "ood_evaluation"

    benchmarks: dict[str, BenchmarkParams] = Field(min_length=1)
    batch_size: PositiveInt = 64
    promotion: PromotionParams = PromotionParams()
    few_shot: FewShotParams = FewShotParams()

    @model_validator(mode="after")
    def _one_enabled(self) -> OodEvaluationParams:
        if not any(benchmark.enabled for benchmark in self.benchmarks.values()):
            raise bad_value(
                "benchmarks",
                {name: {"enabled": False} for name in self.benchmarks},
                "every benchmark is disabled; allowed: at least one benchmark with enabled: true",
            )
        enabled = list(self.enabled_benchmarks())
        if self.promotion.benchmark is not None and self.promotion.benchmark not in enabled:
            raise bad_value(
                "promotion.benchmark",
                self.promotion.benchmark,
                f"not an enabled benchmark; allowed: {enabled}",
            )
        if self.few_shot.k:
            self._check_few_shot_sources()
        return self

    def _check_few_shot_sources(self) -> None:
        """The few-shot sources against the domains known without reading the disk (a
        ``folders`` benchmark's are checked when it is scanned, by the preflight hook)."""
        if problem := self.few_shot_source_problem(
            {name: self.evaluated_domains(name) for name in self.enabled_benchmarks()}
        ):
            raise bad_value(*problem)

    def few_shot_source_problem(self, found: Mapping[str, Sequence[str] | None]) -> tuple[str, Any, str] | None:
        """Why the few-shot sources do not fit the evaluated domains ``found`` per enabled
        benchmark (None: not known yet), as ``(key, value, reason)``: a source benchmark that
        is not enabled, a source domain that is not evaluated, or no domain left to score."""
        sources = self.few_shot.source_domains
        if unknown := [name for name in sources if name not in found]:
            return "few_shot.source_domains", sources, f"{unknown} not enabled benchmarks; allowed: {list(found)}"
        for name, domains in sources.items():
            known = found[name]
            if known is not None and (missing := [domain for domain in domains if domain not in known]):
                return (
                    f"few_shot.source_domains.{name}",
                    domains,
                    f"{missing} not evaluated domains; allowed: {list(known)}",
                )
        if all(known is not None and set(known) <= set(sources.get(name, [])) for name, known in found.items()):
            return (
                "few_shot.source_domains",
                sources,
                "leaves no evaluated domain to score the few-shot student on; allowed: sources that leave one out",
            )
        return None

    def few_shot_source_error(self, found: Mapping[str, Sequence[str]]) -> str | None:
        """:meth:`few_shot_source_problem` for the domains found on disk, as one line."""
        if problem := self.few_shot_source_problem(found):
            key, value, reason = problem
            return f"{self.section}.{key}={value!r}: {reason}"
        return None

    def few_shot_shortage_error(self, counts: Mapping[str, Mapping[str, int]], images: str) -> str | None:
        """Why the source domains cannot give ``few_shot.k`` images of every class, as one
        line, or None. ``counts``: per class, the ``images`` found (``"image files"`` before
        the run, ``"readable images"`` once decoded) in each source domain
        (``<benchmark>/<domain>``, as :meth:`FewShotParams.source_names`)."""
        k = self.few_shot.k
        totals = {name: sum(found.values()) for name, found in counts.items()}
        if all(total >= k for total in totals.values()):
            return None
        key = f"{self.section}.few_shot.k={k}"
        sources = ", ".join(self.few_shot.source_names())
        if absent := [name for name, total in totals.items() if total == 0]:
            classes = f"class {absent[0]!r} has" if len(absent) == 1 else f"classes {absent} have"
            return (
                f"{key}: {classes} no {images} in the source domains {sources}; allowed: "
                f"{self.section}.few_shot.source_domains that hold k={k} {images} of every class"
            )
        fewest = min(totals, key=totals.get)
        where = ", ".join(f"{domain}: {count}" for domain, count in counts[fewest].items())
        return (
            f"{key}: class {fewest!r} has {totals[fewest]} {images} in the source domains ({where}), the fewest "
            f"of any class; allowed: k <= {totals[fewest]}, or more source domains"
        )

    def evaluated_domains(self, name: str) -> list[str] | None:
        """The domains evaluated of benchmark ``name``: its ``domains``, else its published
        ones; None for a ``folders`` layout without ``domains`` (every folder on disk)."""
        benchmark = self.benchmarks[name]
        if benchmark.domains is not None:
            return list(benchmark.domains)
        if benchmark.layout == "folders":
            return None
        layout = LAYOUTS[benchmark.layout]
        return list(layout.default_domains or layout.domains)

    def promotion_benchmark(self) -> str:
        """The benchmark whose average decides promotion."""
        return self.promotion.benchmark or next(iter(self.enabled_benchmarks()))

    def enabled_benchmarks(self) -> dict[str, BenchmarkParams]:
        return {name: benchmark for name, benchmark in self.benchmarks.items() if benchmark.enabled}
