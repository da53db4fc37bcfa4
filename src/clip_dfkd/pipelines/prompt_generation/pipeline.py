from kedro.pipeline import Node, Pipeline

from clip_dfkd.pipelines import namespaced
from clip_dfkd.pipelines.prompt_generation.nodes import (
    build_style_bank,
    generate_prompts,
    load_prompt_encoder,
    measure_prompt_diversity,
)
from clip_dfkd.pipelines.teacher_labeling.pipeline import TEACHER_LOADER, create_teacher_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    # Pseudo-words live in the text encoder that conditions synthesis: the generator's for
    # diffusion, the teacher's (loaded once per run, shared by reference) for inversion.
    return create_teacher_pipeline().only_nodes(TEACHER_LOADER) + namespaced(
        "prompt_generation",
        [
            Node(
                load_prompt_encoder,
                inputs=["teacher_model", "params:image_synthesis", "params:runtime"],
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
        ],
    )
