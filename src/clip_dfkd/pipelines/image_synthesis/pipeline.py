from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines.image_synthesis.nodes import plot_sample_grid, synthesize_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                synthesize_images,
                inputs=["prompt_table", "style_bank", "params:image_synthesis", "params:runtime"],
                outputs=["synthetic_images", "synthesis_manifest"],
                name="synthesize_images",
            ),
            Node(
                plot_sample_grid,
                inputs=["synthetic_images", "synthesis_manifest", "params:image_synthesis"],
                outputs="synthetic_sample_grid",
                name="plot_sample_grid",
            ),
        ]
    )
