from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import RUNS_TEACHER, namespaced
from clip_dfkd.pipelines.ood_evaluation.few_shot import draw_few_shot, fine_tune_student
from clip_dfkd.pipelines.ood_evaluation.plots import plot_confusion_matrices, plot_domain_accuracy
from clip_dfkd.pipelines.ood_evaluation.scoring import (
    index_benchmarks,
    per_class_accuracy,
    predict_student,
    predict_teacher,
    score_domains,
    summarise_evaluation,
)
from clip_dfkd.promotion import describe_evaluated_student, promote_student


def create_pipeline(**kwargs) -> Pipeline:
    return namespaced(
        "ood_evaluation",
        [
            Node(
                index_benchmarks,
                inputs=["params:classes", "params:ood_evaluation"],
                outputs=["ood_benchmark_index", "ood_listed_skips"],
                name="index_benchmarks",
            ),
            Node(
                draw_few_shot,
                inputs=["ood_benchmark_index", "params:classes", "params:ood_evaluation"],
                outputs=["few_shot_images", "few_shot_evaluation_index"],
                name="draw_few_shot",
            ),
            Node(
                fine_tune_student,
                inputs=[
                    "student_model",
                    "few_shot_images",
                    "params:classes",
                    "params:teacher",
                    "params:ood_evaluation",
                    "params:runtime",
                ],
                outputs=["few_shot_student_model", "few_shot_training_metrics"],
                name="fine_tune_student",
                tags=[RUNS_TEACHER],
            ),
            Node(
                predict_teacher,
                inputs=[
                    "ood_benchmark_index",
                    "params:classes",
                    "params:teacher",
                    "params:ood_evaluation",
                    "params:runtime",
                    "ood_teacher_cache",
                ],
                outputs="ood_teacher_predictions",
                name="predict_teacher",
                tags=[RUNS_TEACHER],
            ),
            Node(
                predict_student,
                inputs=["ood_benchmark_index", "student_model", "params:ood_evaluation", "params:runtime"],
                outputs="ood_student_predictions",
                name="predict_student",
            ),
            Node(
                predict_student,
                inputs=[
                    "few_shot_evaluation_index",
                    "few_shot_student_model",
                    "params:ood_evaluation",
                    "params:runtime",
                ],
                outputs="few_shot_student_predictions",
                name="predict_few_shot_student",
            ),
            Node(
                score_domains,
                inputs=[
                    "ood_benchmark_index",
                    "ood_listed_skips",
                    "ood_teacher_predictions",
                    "ood_student_predictions",
                    "few_shot_evaluation_index",
                    "few_shot_student_predictions",
                    "params:classes",
                    "params:ood_evaluation",
                ],
                outputs=["ood_domain_results", "ood_skipped_files", "ood_predictions"],
                name="score_domains",
            ),
            Node(
                per_class_accuracy,
                inputs="ood_predictions",
                outputs="ood_per_class_accuracy",
                name="per_class_accuracy",
            ),
            Node(
                plot_confusion_matrices,
                inputs=["ood_predictions", "params:classes"],
                outputs="ood_confusion_matrices",
                name="plot_confusion_matrices",
            ),
            Node(
                # student_registration is made by student_distillation; run alone, this stage
                # reads the one on disk.
                describe_evaluated_student,
                inputs=["student_model", "student_registration"],
                outputs="ood_evaluated_student",
                name="describe_evaluated_student",
            ),
            Node(
                summarise_evaluation,
                inputs=["ood_domain_results", "params:ood_evaluation"],
                outputs=[
                    "ood_evaluation_table",
                    "ood_evaluation_report",
                    "ood_evaluation_metrics",
                    "few_shot_evaluation_metrics",
                ],
                name="summarise_evaluation",
            ),
            Node(
                promote_student,
                inputs=[
                    "ood_evaluated_student",
                    "ood_evaluation_table",
                    "ood_evaluation_report",
                    "params:ood_evaluation",
                ],
                outputs="ood_promotion",
                name="promote_student",
            ),
            Node(
                plot_domain_accuracy,
                inputs="ood_domain_results",
                outputs="ood_accuracy_chart",
                name="plot_domain_accuracy",
            ),
        ],
    )
