from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import RUNS_TEACHER_FOR_INVERSION, namespaced
from clip_dfkd.pipelines.image_synthesis.nodes import plot_sample_grid, record_synthesis, synthesize_images


def create_pipeline(**kwargs) -> Pipeline:
    return namespaced(
        "image_synthesis",
        [
            Node(
                synthesize_images,
                inputs=[
                    "prompt_table",
                    "style_bank",
                    "params:image_synthesis",
                    "params:teacher",
                    "params:runtime",
                ],
                outputs=["synthetic_images", "synthesis_plan", "render_timing"],
                name="synthesize_images",
                tags=[RUNS_TEACHER_FOR_INVERSION],
            ),
            # Reads the saved images back, so the manifest holds what each image's synthesis
            # measured, including images an interrupted earlier run rendered.
            Node(
                record_synthesis,
                inputs=["synthetic_images", "synthesis_plan", "render_timing"],
                outputs=["synthesis_manifest", "image_synthesis_metrics"],
                name="record_synthesis",
            ),
            Node(
                plot_sample_grid,
                inputs=["synthetic_images", "synthesis_manifest", "params:image_synthesis"],
                outputs="synthetic_sample_grid",
                name="plot_sample_grid",
            ),
        ],
    )
