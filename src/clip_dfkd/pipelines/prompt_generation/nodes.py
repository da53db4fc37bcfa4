from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # nodes draw off-screen, also on machines with a display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure

from clip_dfkd.models import load_teacher
from clip_dfkd.models.text_encoders import (
    PLACEHOLDER,
    OpenClipTextEncoder,
    PseudoWordEncoder,
    load_generator_text_encoder,
)
from clip_dfkd.naming import slugify, stable_seed
from clip_dfkd.params import ClassNames, ImageSynthesisParams, PromptGenerationParams, RuntimeParams, TeacherParams
from clip_dfkd.runtime import Runtime
from clip_dfkd.styles import (
    StyleBank,
    contrastive_prompt_bank,
    diversity_metrics,
    empty_bank,
    mix_prompt_bank,
    norm_ratio_summary,
    random_prompt_bank,
    real_word_rows,
)

logger = logging.getLogger(__name__)

PROMPT_COLUMNS = {
    "prompt_id": "string",
    "class_name": "string",
    "class_index": "int64",
    "style": "string",
    "template": "string",
    "prompt": "string",
    "method": "string",
    # Pseudo-word prompts hold "[S*]" where this vector of the style bank goes; hand-written
    # prompts have none.
    "style_vector_id": "string",
    "seed": "int64",
}


def load_prompt_encoder(
    image_synthesis: ImageSynthesisParams, teacher: TeacherParams, runtime: RuntimeParams
) -> PseudoWordEncoder:
    """The text encoder that conditions synthesis, in whose embedding space pseudo-words live:
    the generator's for ``diffusion``, the teacher's own text tower for ``inversion``. Each node
    that needs it loads its own, so it is gone when the node returns (not held on the device
    while synthesis renders)."""
    resolved = Runtime.resolve(runtime)
    if image_synthesis.backend == "inversion":
        teacher_model = load_teacher(teacher, resolved)
        return OpenClipTextEncoder(teacher_model.model, teacher_model.tokenizer, teacher_model.name, resolved)
    return load_generator_text_encoder(image_synthesis.generator, resolved)


def build_style_bank(
    classes: ClassNames,
    params: PromptGenerationParams,
    image_synthesis: ImageSynthesisParams,
    teacher: TeacherParams,
    runtime: RuntimeParams,
) -> tuple[StyleBank, dict[str, list[dict[str, float]]]]:
    """:func:`style_bank_from` the prompt encoder (:func:`load_prompt_encoder`)."""
    return style_bank_from(load_prompt_encoder(image_synthesis, teacher, runtime), classes, params)


def style_bank_from(
    prompt_encoder: PseudoWordEncoder, classes: ClassNames, params: PromptGenerationParams
) -> tuple[StyleBank, dict[str, list[dict[str, float]]]]:
    """The method's pseudo-words (none for ``vanilla``) and its metrics: how long the vectors
    are against the run's real words (``style_bank/norm_ratio_{mean,max}``, also in the bank's
    details) and, for ``contrastive``, its loss curves."""
    if params.method == "vanilla":
        return empty_bank(params.method, prompt_encoder), {}
    # The run's own content words: what its encoder is sure to have learnt, in any encoder.
    real_words = real_word_rows(prompt_encoder, [*params.styles, *classes])
    metrics: dict[str, list[dict[str, float]]] = {}
    if params.method == "mix":
        bank = mix_prompt_bank(prompt_encoder, params.styles, params.num_styles, params.mix, params.seed)
    elif params.method == "random":
        bank = random_prompt_bank(prompt_encoder, real_words, params.num_styles, params.seed)
    elif params.contrastive.bank_path is not None:
        bank = StyleBank.load(params.contrastive.bank_path)
        if bank.dim != prompt_encoder.dim:
            raise ValueError(
                f"prompt_generation.contrastive.bank_path={params.contrastive.bank_path!r}: its vectors have "
                f"{bank.dim} dimensions, the text encoder {prompt_encoder.name} needs {prompt_encoder.dim}"
            )
        bank.check_encoder(prompt_encoder, f"prompt_generation.contrastive.bank_path={params.contrastive.bank_path!r}")
        logger.info("Reusing %d contrastive pseudo-words from %s", len(bank.names), params.contrastive.bank_path)
    else:
        bank, history = contrastive_prompt_bank(
            prompt_encoder,
            real_words,
            list(classes),
            params.pseudo_word_template,
            params.num_styles,
            params.contrastive,
            params.seed,
        )
        metrics = {f"contrastive/{name}": values for name, values in history.items()}
    norm_ratio = norm_ratio_summary(bank, real_words)
    bank.details["norm_ratio"] = norm_ratio
    logger.info(
        "Style bank %s: vector norm / real words' median norm %.2f on average, %.2f at most",
        params.method,
        norm_ratio["mean"],
        norm_ratio["max"],
    )
    for statistic in ("mean", "max"):
        metrics[f"style_bank/norm_ratio_{statistic}"] = [{"value": norm_ratio[statistic], "step": 0}]
    return bank, metrics


def generate_prompts(classes: ClassNames, params: PromptGenerationParams, style_bank: StyleBank) -> pd.DataFrame:
    """One row per image to synthesise: every class in every style, ``images_per_class_and_style``
    times. Hand-written styles cycle through ``templates``; pseudo-word styles fill
    ``pseudo_word_template`` with ``[S*]`` and reference their vector."""
    if params.method == "vanilla":
        styles = [(style, None) for style in params.styles]
    else:
        styles = [(name.rsplit("-", 1)[0], name) for name in style_bank.names]
    rows = []
    for class_index, class_name in enumerate(classes):
        for style, vector_id in styles:
            for repeat in range(params.images_per_class_and_style):
                if vector_id is None:
                    template = params.templates[repeat % len(params.templates)]
                    prompt = template.format(style=style, class_name=class_name)
                else:
                    template = params.pseudo_word_template
                    prompt = template.format(style=PLACEHOLDER, class_name=class_name)
                rows.append(
                    {
                        "prompt_id": f"{slugify(class_name)}-{slugify(style)}-{repeat:04d}",
                        "class_name": class_name,
                        "class_index": class_index,
                        "style": style,
                        "template": template,
                        "prompt": prompt,
                        "method": params.method,
                        "style_vector_id": vector_id,
                        "seed": stable_seed(params.seed, class_name, vector_id or style, repeat),
                    }
                )
    table = pd.DataFrame(rows, columns=list(PROMPT_COLUMNS)).astype(PROMPT_COLUMNS)
    # The class list travels with the table (parquet keeps ``attrs``) and with every table
    # derived from it, so a later stage can tell that it was made for other classes.
    table.attrs["classes"] = list(classes)
    logger.info(
        "%d prompts: %d classes × %d styles × %d images (method %s)",
        len(table),
        len(classes),
        len(styles),
        params.images_per_class_and_style,
        params.method,
    )
    return table


def encode_prompts(prompts: pd.DataFrame, style_bank: StyleBank, encoder: PseudoWordEncoder) -> torch.Tensor:
    """Text features of each row's prompt, its pseudo-word spliced in where it has one."""
    vector_ids = prompts["style_vector_id"].dropna()
    vectors = style_bank.lookup(list(vector_ids)) if len(vector_ids) else None
    with torch.no_grad():
        return encoder.encode(list(prompts["prompt"]), vectors).cpu()


def measure_prompt_diversity(
    prompt_table: pd.DataFrame,
    style_bank: StyleBank,
    image_synthesis: ImageSynthesisParams,
    teacher: TeacherParams,
    runtime: RuntimeParams,
) -> tuple[dict[str, dict[str, float]], Figure]:
    """:func:`prompt_diversity` in the prompt encoder (:func:`load_prompt_encoder`)."""
    return prompt_diversity(prompt_table, style_bank, load_prompt_encoder(image_synthesis, teacher, runtime))


def prompt_diversity(
    prompt_table: pd.DataFrame, style_bank: StyleBank, prompt_encoder: PseudoWordEncoder
) -> tuple[dict[str, dict[str, float]], Figure]:
    """The diversity of the style prompts' text features (mean pairwise cosine distance,
    higher is more diverse), per class and as the mean over classes, and a 2-D PCA of the
    features coloured by style."""
    prompts = prompt_table.drop_duplicates(["class_name", "style", "prompt"]).reset_index(drop=True)
    features = encode_prompts(prompts, style_bank, prompt_encoder)
    metrics = diversity_metrics("style prompts", features, list(prompts["class_name"]))
    diversity = metrics["average"]["value"]
    return metrics, _plot_projection(features, prompts, prompt_table["method"].iloc[0], diversity)


def _plot_projection(features: torch.Tensor, prompts: pd.DataFrame, method: str, diversity: float) -> Figure:
    centred = features - features.mean(dim=0)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    points = (centred @ components[:2].T).numpy()
    figure, axis = plt.subplots(figsize=(7.6, 4.8), layout="constrained")
    styles = list(dict.fromkeys(prompts["style"]))
    colours = plt.get_cmap("tab20" if len(styles) > 10 else "tab10")
    markers = "o^sDvP*Xh<>"
    classes = list(dict.fromkeys(prompts["class_name"]))
    for s, style in enumerate(styles):
        for c, class_name in enumerate(classes):
            mask = ((prompts["style"] == style) & (prompts["class_name"] == class_name)).to_numpy()
            axis.scatter(
                points[mask, 0],
                points[mask, 1],
                color=colours(s % colours.N),
                marker=markers[c % len(markers)],
                s=36,
            )
    axis.set_title(
        f"Prompt features ({method}): diversity {diversity:.3f} (mean pairwise cosine distance)", fontsize=10
    )
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    # One legend outside the axes, where constrained layout makes room for it.
    handles = [plt.Line2D([], [], linestyle="", label="style (colour)")]
    handles += [
        plt.Line2D([], [], color=colours(s % colours.N), marker="o", linestyle="", label=style)
        for s, style in enumerate(styles[:20])
    ]
    handles += [plt.Line2D([], [], linestyle="", label="class (marker)")]
    handles += [
        plt.Line2D([], [], color="grey", marker=markers[c % len(markers)], linestyle="", label=name)
        for c, name in enumerate(classes)
    ]
    figure.legend(handles=handles, loc="outside right upper", fontsize=7)
    return figure
