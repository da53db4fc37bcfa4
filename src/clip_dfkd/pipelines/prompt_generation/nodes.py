from __future__ import annotations

import logging

import pandas as pd

from clip_dfkd.naming import slugify, stable_seed
from clip_dfkd.params import ClassNames, PromptGenerationParams

logger = logging.getLogger(__name__)

PROMPT_COLUMNS = {
    "prompt_id": "string",
    "class_name": "string",
    "class_index": "int64",
    "style": "string",
    "template": "string",
    "prompt": "string",
    "method": "string",
    # Pseudo-word methods put a learned or sampled style vector in place of the style word;
    # this names it in the style-vector bank. Hand-written prompts have none.
    "style_vector_id": "string",
    "seed": "int64",
}


def generate_prompts(classes: ClassNames, params: PromptGenerationParams) -> pd.DataFrame:
    """One row per image to synthesise: every class in every style, ``images_per_class_and_style``
    times, cycling through the templates."""
    rows = []
    for class_index, class_name in enumerate(classes):
        for style in params.styles:
            for repeat in range(params.images_per_class_and_style):
                template = params.templates[repeat % len(params.templates)]
                rows.append(
                    {
                        "prompt_id": f"{slugify(class_name)}-{slugify(style)}-{repeat:04d}",
                        "class_name": class_name,
                        "class_index": class_index,
                        "style": style,
                        "template": template,
                        "prompt": template.format(style=style, class_name=class_name),
                        "method": params.method,
                        "style_vector_id": None,
                        "seed": stable_seed(params.seed, class_name, style, repeat),
                    }
                )
    table = pd.DataFrame(rows, columns=list(PROMPT_COLUMNS)).astype(PROMPT_COLUMNS)
    logger.info(
        "%d prompts: %d classes × %d styles × %d images (method %s)",
        len(table),
        len(classes),
        len(params.styles),
        params.images_per_class_and_style,
        params.method,
    )
    return table
