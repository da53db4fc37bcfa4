from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines.prompt_generation.nodes import (
    build_style_bank,
    generate_prompts,
    load_prompt_encoder,
    measure_prompt_diversity,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                load_prompt_encoder,
                inputs=["params:image_synthesis", "params:runtime"],
                outputs="prompt_encoder_model",
                name="load_prompt_encoder",
            ),
            Node(
                build_style_bank,
                inputs=["prompt_encoder_model", "params:classes", "params:prompt_generation"],
                outputs=["style_bank", "prompt_generation_metrics"],
                name="build_style_bank",
            ),
            Node(
                generate_prompts,
                inputs=["params:classes", "params:prompt_generation", "style_bank"],
                outputs="prompt_table",
                name="generate_prompts",
            ),
            Node(
                measure_prompt_diversity,
                inputs=["prompt_table", "style_bank", "prompt_encoder_model"],
                outputs=["prompt_diversity_metrics", "prompt_diversity_plot"],
                name="measure_prompt_diversity",
            ),
        ]
    )
