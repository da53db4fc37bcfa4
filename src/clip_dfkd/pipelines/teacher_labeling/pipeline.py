from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import namespaced
from clip_dfkd.pipelines.teacher_labeling.nodes import (
    build_zero_shot_head,
    label_images,
    load_teacher_model,
    measure_image_diversity,
    summarise_labels,
)

# The node that loads the teacher, for stages that need the teacher but not its head.
TEACHER_LOADER = "teacher.load_teacher_model"


def create_teacher_pipeline() -> Pipeline:
    """The loaded teacher and its zero-shot head (namespace ``teacher``), shared in memory by
    every stage that needs them; summing pipelines merges these identical nodes, so one run
    loads the teacher once."""
    return namespaced(
        "teacher",
        [
            Node(
                load_teacher_model,
                inputs=["params:teacher", "params:runtime"],
                outputs="teacher_model",
                name="load_teacher_model",
            ),
            Node(
                build_zero_shot_head,
                inputs=["teacher_model", "params:classes", "params:teacher"],
                outputs="zero_shot_head",
                name="build_zero_shot_head",
            ),
        ],
    )


def create_pipeline(**kwargs) -> Pipeline:
    return create_teacher_pipeline() + namespaced(
        "teacher_labeling",
        [
            Node(
                label_images,
                inputs=[
                    "synthetic_images",
                    "synthesis_manifest",
                    "teacher_model",
                    "zero_shot_head",
                    "params:teacher",
                    "params:teacher_labeling",
                ],
                outputs="teacher_labels",
                name="label_images",
            ),
            Node(
                summarise_labels,
                inputs="teacher_labels",
                outputs=["teacher_label_summary", "teacher_labeling_metrics"],
                name="summarise_labels",
            ),
            Node(
                measure_image_diversity,
                inputs="teacher_labels",
                outputs="image_diversity_metrics",
                name="measure_image_diversity",
            ),
        ],
    )
