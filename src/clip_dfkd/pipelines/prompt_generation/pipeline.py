from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines.prompt_generation.nodes import generate_prompts


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                generate_prompts,
                inputs=["params:classes", "params:prompt_generation"],
                outputs="prompt_table",
                name="generate_prompts",
            )
        ]
    )
