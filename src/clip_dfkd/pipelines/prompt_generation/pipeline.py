from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import RUNS_TEACHER_FOR_INVERSION, namespaced
from clip_dfkd.pipelines.prompt_generation.nodes import (
    build_style_bank,
    generate_prompts,
    measure_prompt_diversity,
)


def create_pipeline(**kwargs) -> Pipeline:
    # Pseudo-words live in the text encoder that conditions synthesis (the generator's for
    # diffusion, the teacher's for inversion); the two nodes that use it load it themselves.
    encoder_params = ["params:image_synthesis", "params:teacher", "params:runtime"]
    return namespaced(
        "prompt_generation",
        [
            Node(
                build_style_bank,
                inputs=["params:classes", "params:prompt_generation", *encoder_params],
                outputs=["style_bank", "prompt_generation_metrics"],
                name="build_style_bank",
                tags=[RUNS_TEACHER_FOR_INVERSION],
            ),
            Node(
                generate_prompts,
                inputs=["params:classes", "params:prompt_generation", "style_bank"],
                outputs="prompt_table",
                name="generate_prompts",
            ),
            Node(
                measure_prompt_diversity,
                inputs=["prompt_table", "style_bank", *encoder_params],
                outputs=["prompt_diversity_metrics", "prompt_diversity_plot"],
                name="measure_prompt_diversity",
                tags=[RUNS_TEACHER_FOR_INVERSION],
            ),
        ],
    )
