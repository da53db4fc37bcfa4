from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import RUNS_TEACHER, namespaced
from clip_dfkd.pipelines.teacher_labeling.nodes import label_images, measure_image_diversity, summarise_labels


def create_pipeline(**kwargs) -> Pipeline:
    return namespaced(
        "teacher_labeling",
        [
            Node(
                label_images,
                inputs=[
                    "synthetic_images",
                    "synthesis_manifest",
                    "params:classes",
                    "params:teacher",
                    "params:teacher_labeling",
                    "params:student_distillation",
                    "params:runtime",
                ],
                outputs=["teacher_labels", "teacher_view_labels"],
                name="label_images",
                tags=[RUNS_TEACHER],
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
