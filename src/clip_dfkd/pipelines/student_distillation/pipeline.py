from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import RUNS_TEACHER_ONLINE, namespaced
from clip_dfkd.pipelines.student_distillation.nodes import register_student, train_student


def create_pipeline(**kwargs) -> Pipeline:
    return namespaced(
        "student_distillation",
        [
            Node(
                train_student,
                inputs=[
                    "synthetic_images",
                    "teacher_labels",
                    "teacher_view_labels",
                    "params:classes",
                    "params:teacher",
                    "params:student_distillation",
                    "params:runtime",
                ],
                outputs=["student_model", "student_distillation_metrics"],
                name="train_student",
                tags=[RUNS_TEACHER_ONLINE],
            ),
            Node(
                register_student,
                inputs=[
                    "student_model",
                    "params:classes",
                    "params:teacher",
                    "params:image_synthesis",
                    "params:prompt_generation",
                    "params:student_distillation",
                ],
                outputs="student_registration",
                name="register_student",
            ),
        ],
    )
