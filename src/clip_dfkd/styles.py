"""Style banks: the pseudo-words of Mix-, Random- and Contrastive-Prompt, and how diverse
prompts are. The formulation and where each choice comes from: docs/prompt_diversification.md."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import trange

from clip_dfkd.atomic import atomic_file
from clip_dfkd.models.text_encoders import PLACEHOLDER, PseudoWordEncoder
from clip_dfkd.naming import slugify, stable_seed
from clip_dfkd.params import ContrastivePromptParams, MixPromptParams

logger = logging.getLogger(__name__)

_METADATA_KEY = "clip_dfkd.style_bank"


@dataclass
class StyleBank:
    """Named pseudo-word vectors ``(n, dim)`` for one text encoder."""

    method: str
    encoder: str
    vectors: torch.Tensor
    names: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, method: str, encoder: str, vectors: torch.Tensor, details: dict[str, Any]) -> StyleBank:
        """Names are ``<method>-<index>-<content hash>``: a changed vector never reuses the
        name (and so never the images) of an old one."""
        vectors = vectors.detach().float().cpu().contiguous()
        names = [
            f"{method}-{index:03d}-{hashlib.sha256(vector.numpy().tobytes()).hexdigest()[:8]}"
            for index, vector in enumerate(vectors)
        ]
        return cls(method, encoder, vectors, names, details)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def lookup(self, names: Sequence[str]) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.names)}
        unknown = [name for name in names if name not in index]
        if unknown:
            raise KeyError(f"style_bank has no vector {unknown[0]!r}; rerun prompt_generation")
        return self.vectors[[index[name] for name in names]]

    def save(self, path: str | Path) -> None:
        metadata = {"method": self.method, "encoder": self.encoder, "names": self.names, "details": self.details}
        with atomic_file(Path(path)) as staging:
            save_file({"vectors": self.vectors}, staging, metadata={_METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | Path) -> StyleBank:
        with safe_open(str(path), "pt") as handle:
            metadata = json.loads(handle.metadata()[_METADATA_KEY])
        vectors = load_file(str(path))["vectors"]
        return cls(metadata["method"], metadata["encoder"], vectors, metadata["names"], metadata["details"])


def saved_bank_dim(path: str | Path) -> int:
    """The vector size of a saved bank, read from the file header only.

    Raises:
        ValueError: the file is not a style bank saved by :meth:`StyleBank.save`.
    """
    try:
        with safe_open(str(path), "pt") as handle:
            if _METADATA_KEY not in (handle.metadata() or {}) or "vectors" not in handle.keys():  # noqa: SIM118
                raise ValueError("a safetensors file without a style bank's vectors and metadata")
            return handle.get_slice("vectors").get_shape()[1]
    except SafetensorError as exc:
        raise ValueError(f"not a safetensors file ({exc})") from None


def empty_bank(method: str, encoder: PseudoWordEncoder) -> StyleBank:
    return StyleBank(method, encoder.name, torch.zeros(0, encoder.dim))


# --- Mix-Prompt ------------------------------------------------------------------------


def mix_style_vector(word_embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The convex combination ``weights @ word_embeddings`` of ``(k, dim)`` style-word embeddings."""
    return weights.to(word_embeddings.dtype) @ word_embeddings


def mix_prompt_bank(
    encoder: PseudoWordEncoder, styles: Sequence[str], num_styles: int, params: MixPromptParams, seed: int
) -> StyleBank:
    """Each pseudo-word mixes ``k`` distinct style words drawn from ``styles`` with weights
    from a symmetric Dirichlet(``alpha``); one seeded draw per pseudo-word."""
    words = torch.stack([encoder.word_embedding(style) for style in styles])
    vectors, recipes = [], []
    for index in range(num_styles):
        rng = np.random.default_rng(stable_seed(seed, "mix", index))
        chosen = rng.choice(len(styles), size=params.k, replace=False)
        weights = rng.dirichlet(np.full(params.k, params.alpha))
        vectors.append(mix_style_vector(words[torch.from_numpy(chosen)], torch.from_numpy(weights)))
        recipes.append({"words": [styles[i] for i in chosen.tolist()], "weights": weights.tolist()})
    return StyleBank.create(
        "mix", encoder.name, torch.stack(vectors), {"k": params.k, "alpha": params.alpha, "mixes": recipes}
    )


# --- Random-Prompt ---------------------------------------------------------------------


def token_embedding_statistics(encoder: PseudoWordEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the whole token-embedding table."""
    table = encoder.token_embeddings()
    return table.mean(dim=0), table.std(dim=0)


def random_prompt_bank(encoder: PseudoWordEncoder, num_styles: int, seed: int) -> StyleBank:
    """Pseudo-words drawn from N(mean_d, std_d) per dimension of the token-embedding table."""
    mean, std = token_embedding_statistics(encoder)
    noise = torch.randn(num_styles, encoder.dim, generator=torch.Generator().manual_seed(stable_seed(seed, "random")))
    return StyleBank.create("random", encoder.name, mean + std * noise, {"statistics": "per-dimension gaussian"})


# --- Contrastive-Prompt ----------------------------------------------------------------


def style_diversity_loss(style_features: torch.Tensor) -> torch.Tensor:
    """Mean absolute cosine similarity between distinct style features: 0 when orthogonal."""
    features = F.normalize(style_features, dim=-1)
    similarity = features @ features.T
    off_diagonal = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    return similarity[off_diagonal].abs().mean()


def contrastive_prompt_bank(
    encoder: PseudoWordEncoder,
    classes: Sequence[str],
    template: str,
    num_styles: int,
    params: ContrastivePromptParams,
    seed: int,
) -> tuple[StyleBank, dict[str, list[dict[str, float]]]]:
    """Learn ``num_styles`` pseudo-words with the text encoder frozen.

    Loss = ``style_weight`` · style-diversity (features of the style-only prompts
    ``template`` without its class pushed apart) + ``content_weight`` · content consistency
    (cross-entropy of classifying ``template`` filled with each class among the class-name
    prompts, at ``temperature``). Returns the bank and per-iteration loss curves.
    """
    vectors = torch.nn.Parameter(random_prompt_bank(encoder, num_styles, seed).vectors.to(encoder.device))
    style_texts = [" ".join(template.format(style=PLACEHOLDER, class_name="").split())] * num_styles
    content_texts = [template.format(style=PLACEHOLDER, class_name=name) for _ in range(num_styles) for name in classes]
    targets = torch.arange(len(classes), device=encoder.device).repeat(num_styles)
    with torch.no_grad():
        class_features = F.normalize(encoder.encode(list(classes)), dim=-1)
    optimizer = torch.optim.Adam([vectors], lr=params.learning_rate)
    history: dict[str, list[dict[str, float]]] = {
        name: [] for name in ("style_loss", "content_loss", "total_loss", "content_accuracy")
    }
    for step in trange(params.iterations, desc="Learning contrastive prompts", unit="it"):
        style_loss = style_diversity_loss(encoder.encode(style_texts, vectors))
        content_vectors = vectors.repeat_interleave(len(classes), dim=0)
        content_features = F.normalize(encoder.encode(content_texts, content_vectors), dim=-1)
        logits = content_features @ class_features.T / params.temperature
        content_loss = F.cross_entropy(logits, targets)
        total = params.style_weight * style_loss + params.content_weight * content_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        accuracy = (logits.argmax(-1) == targets).float().mean()
        for name, value in (
            ("style_loss", style_loss),
            ("content_loss", content_loss),
            ("total_loss", total),
            ("content_accuracy", accuracy),
        ):
            history[name].append({"value": float(value.detach()), "step": step})
    logger.info(
        "Contrastive prompts: style loss %.4f → %.4f, content accuracy %.3f → %.3f",
        history["style_loss"][0]["value"],
        history["style_loss"][-1]["value"],
        history["content_accuracy"][0]["value"],
        history["content_accuracy"][-1]["value"],
    )
    details = {"template": template, **params.model_dump(exclude={"bank_path"})}
    return StyleBank.create("contrastive", encoder.name, vectors.detach(), details), history


# --- diversity -------------------------------------------------------------------------


def mean_pairwise_cosine_distance(features: torch.Tensor) -> float:
    """Mean cosine distance (1 − cosine similarity) over distinct pairs of rows: 0 when all
    rows point the same way, 1 when they are orthogonal on average; higher is more diverse.
    NaN below two rows."""
    if len(features) < 2:
        return float("nan")
    normalised = F.normalize(features.float(), dim=-1)
    similarity = normalised @ normalised.T
    n = len(features)
    return 1.0 - float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


def diversity_metrics(what: str, features: torch.Tensor, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``class/<class>``: the mean pairwise cosine distance of the rows of ``features`` that
    belong to each class (``class_names`` gives each row's class), and ``average``: its mean
    over classes; in the shape the metrics datasets log. ``what`` names the rows in the log."""
    labels = np.asarray(class_names)
    per_class = {
        class_name: mean_pairwise_cosine_distance(features[torch.from_numpy(labels == class_name)])
        for class_name in dict.fromkeys(class_names)
    }
    average = float(np.mean(list(per_class.values())))
    logger.info("Diversity of the %s (mean pairwise cosine distance, higher is more diverse): %.4f", what, average)
    metrics = {"average": {"value": average, "step": 0}}
    metrics |= {f"class/{slugify(cls)}": {"value": value, "step": 0} for cls, value in per_class.items()}
    return metrics
