from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines.ood_evaluation.nodes import (
    describe_evaluated_student,
    evaluate_domains,
    plot_domain_accuracy,
    summarise_evaluation,
)
from clip_dfkd.pipelines.teacher_labeling.pipeline import create_teacher_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    return create_teacher_pipeline() + Pipeline(
        [
            Node(
                evaluate_domains,
                inputs=[
                    "student_model",
                    "teacher_model",
                    "zero_shot_head",
                    "params:classes",
                    "params:ood_evaluation",
                    "params:runtime",
                ],
                outputs=["ood_domain_results", "ood_skipped_files", "ood_predictions"],
                name="evaluate_domains",
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
                inputs="ood_domain_results",
                outputs=["ood_evaluation_table", "ood_evaluation_report", "ood_evaluation_metrics"],
                name="summarise_evaluation",
            ),
            Node(
                plot_domain_accuracy,
                inputs="ood_domain_results",
                outputs="ood_accuracy_chart",
                name="plot_domain_accuracy",
            ),
        ]
    )
