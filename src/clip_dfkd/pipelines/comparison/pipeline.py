from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import namespaced
from clip_dfkd.pipelines.comparison.nodes import collect_evaluations, plot_comparison, tabulate_comparison


def create_pipeline(**kwargs) -> Pipeline:
    # Reads finished runs, so it is not one of the stages of `kedro run` (pipeline_registry).
    return namespaced(
        "comparison",
        [
            Node(
                collect_evaluations,
                inputs="params:comparison",
                outputs="comparison_results",
                name="collect_evaluations",
            ),
            Node(
                tabulate_comparison,
                inputs=["comparison_results", "params:comparison"],
                outputs=["comparison_table", "comparison_report"],
                name="tabulate_comparison",
            ),
            Node(
                plot_comparison,
                inputs="comparison_results",
                outputs="comparison_chart",
                name="plot_comparison",
            ),
        ],
    )
