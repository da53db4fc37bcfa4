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

from clip_dfkd.atomic import atomic_file
from clip_dfkd.errors import UserError
from clip_dfkd.models.text_encoders import PLACEHOLDER, PseudoWordEncoder
from clip_dfkd.naming import slugify, stable_seed
from clip_dfkd.params import ContrastivePromptParams, MixPromptParams
from clip_dfkd.progress import track

logger = logging.getLogger(__name__)

_METADATA_KEY = "clip_dfkd.style_bank"


@dataclass
class StyleBank:
    """Named pseudo-word vectors ``(n, dim)`` for one text encoder: ``encoder`` names it and
    ``encoder_identity`` (:attr:`PseudoWordEncoder.identity`) tells its token space from any
    other's of the same width."""

    method: str
    encoder: str
    vectors: torch.Tensor
    names: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    encoder_identity: str | None = None

    @classmethod
    def create(
        cls, method: str, encoder: PseudoWordEncoder, vectors: torch.Tensor, details: dict[str, Any]
    ) -> StyleBank:
        """Names are ``<method>-<index>-<content hash>``: a changed vector never reuses the
        name (and so never the images) of an old one."""
        vectors = vectors.detach().float().cpu().contiguous()
        names = [
            f"{method}-{index:03d}-{hashlib.sha256(vector.numpy().tobytes()).hexdigest()[:8]}"
            for index, vector in enumerate(vectors)
        ]
        return cls(method, encoder.name, vectors, names, details, encoder.identity)

    def check_encoder(self, encoder: PseudoWordEncoder, source: str) -> None:
        """Refuses to splice these pseudo-words into another encoder's token space.

        Raises:
            StyleBankEncoderError: ``encoder`` is not the one the bank was made with.
        """
        if not self.names:
            return
        identity = encoder.identity  # hashes the whole token table: once
        if self.encoder_identity == identity:
            return
        made_with = (
            f"{self.encoder} (token table {self.encoder_identity})"
            if self.encoder_identity
            else f"{self.encoder}, in a version that recorded no token table"
        )
        raise StyleBankEncoderError(
            f"{source}: its pseudo-words were made in the token space of {made_with}, not of the text encoder "
            f"in use, {encoder.name} (token table {identity}); allowed: a bank made with this encoder "
            "(rerun prompt_generation)"
        )

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
        metadata = {
            "method": self.method,
            "encoder": self.encoder,
            "encoder_identity": self.encoder_identity,
            "names": self.names,
            "details": self.details,
        }
        with atomic_file(Path(path)) as staging:
            save_file({"vectors": self.vectors}, staging, metadata={_METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | Path) -> StyleBank:
        with safe_open(str(path), "pt") as handle:
            metadata = json.loads(handle.metadata()[_METADATA_KEY])
        vectors = load_file(str(path))["vectors"]
        return cls(
            metadata["method"],
            metadata["encoder"],
            vectors,
            metadata["names"],
            metadata["details"],
            metadata.get("encoder_identity"),
        )


class StyleBankEncoderError(UserError, ValueError):
    """A style bank spliced into a text encoder it was not made with."""


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
    return StyleBank(method, encoder.name, torch.zeros(0, encoder.dim), encoder_identity=encoder.identity)


# --- Mix-Prompt ------------------------------------------------------------------------


def mix_style_vector(word_embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The convex combination ``weights @ word_embeddings`` of ``(k, dim)`` style-word embeddings."""
    return weights.to(word_embeddings.dtype) @ word_embeddings


def mix_prompt_bank(
    encoder: PseudoWordEncoder, styles: Sequence[str], num_styles: int, params: MixPromptParams, seed: int
) -> StyleBank:
    """Each pseudo-word mixes ``k`` distinct style words drawn from ``styles`` with weights
    from a symmetric Dirichlet(``alpha``); one seeded draw per pseudo-word. With the defaults
    (4 words, alpha 0.3) a mix is mostly one or two words, and the mixes together reach every
    word of the dictionary."""
    words = torch.stack([encoder.word_embedding(style) for style in styles])
    vectors, recipes = [], []
    for index in range(num_styles):
        rng = np.random.default_rng(stable_seed(seed, "mix", index))
        chosen = rng.choice(len(styles), size=params.k, replace=False)
        weights = rng.dirichlet(np.full(params.k, params.alpha))
        vectors.append(mix_style_vector(words[torch.from_numpy(chosen)], torch.from_numpy(weights)))
        recipes.append({"words": [styles[i] for i in chosen.tolist()], "weights": weights.tolist()})
    return StyleBank.create(
        "mix", encoder, torch.stack(vectors), {"k": params.k, "alpha": params.alpha, "mixes": recipes}
    )


# --- Random-Prompt ---------------------------------------------------------------------


@dataclass(frozen=True)
class RealWordRows:
    """The token-embedding rows of a run's real words: the tokens of its style dictionary and
    class names (:func:`real_word_rows`). They are the reference a pseudo-word is measured
    against and drawn around: rows the encoder was trained on, also in an encoder whose
    training touched only a few rows of its table (the demo's teacher)."""

    rows: torch.Tensor

    @property
    def median_norm(self) -> float:
        return float(self.rows.norm(dim=1).median())

    def norm_ratios(self, vectors: torch.Tensor) -> torch.Tensor:
        """Each vector's norm divided by the real words' median norm: about 1 for a real word."""
        return vectors.detach().float().cpu().norm(dim=1) / self.median_norm

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` draws from the Gaussian with the rows' mean and sample covariance: the mean
        plus random combinations of the rows' deviations from it, so every draw stays in the
        span of real words (no direction that no real word takes)."""
        mean = self.rows.mean(dim=0)
        deviations = (self.rows - mean) / (len(self.rows) - 1) ** 0.5
        return mean + torch.randn(count, len(self.rows), generator=generator) @ deviations


def real_word_rows(encoder: PseudoWordEncoder, words: Sequence[str]) -> RealWordRows:
    """The distinct token rows of ``words`` (each token of a multi-token word is a row).

    Raises:
        ValueError: fewer than two distinct tokens, which give no spread to draw from.
    """
    ids = sorted({token for word in words for token in encoder.word_token_ids(word)})
    if len(ids) < 2:
        raise ValueError(
            f"prompt_generation.styles and classes {list(words)!r} have {len(ids)} distinct token(s) in "
            f"{encoder.name}; pseudo-words need at least 2 to measure and draw from"
        )
    return RealWordRows(encoder.token_embeddings()[torch.tensor(ids)].cpu())


def random_prompt_bank(encoder: PseudoWordEncoder, real_words: RealWordRows, num_styles: int, seed: int) -> StyleBank:
    """Pseudo-words drawn from the Gaussian of the real words' token rows
    (:meth:`RealWordRows.sample`)."""
    vectors = real_words.sample(num_styles, torch.Generator().manual_seed(stable_seed(seed, "random")))
    details = {
        "statistics": "mean and covariance of the real words' token rows",
        "real_word_rows": len(real_words.rows),
    }
    return StyleBank.create("random", encoder, vectors, details)


# --- Contrastive-Prompt ----------------------------------------------------------------


def style_diversity_loss(style_features: torch.Tensor) -> torch.Tensor:
    """Mean absolute cosine similarity between distinct style features: 0 when orthogonal."""
    features = F.normalize(style_features, dim=-1)
    similarity = features @ features.T
    off_diagonal = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    return similarity[off_diagonal].abs().mean()


def limit_norms_(vectors: torch.Tensor, max_norm: float) -> None:
    """Scale, in place, each row of ``vectors`` longer than ``max_norm`` down to it."""
    with torch.no_grad():
        vectors.mul_((max_norm / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))


def contrastive_prompt_bank(
    encoder: PseudoWordEncoder,
    real_words: RealWordRows,
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
    prompts, at ``temperature``). Initialised as Random-Prompt; after every step each vector
    longer than ``max_norm_ratio`` × the real words' median norm is scaled back to that bound
    (none with ``max_norm_ratio`` None), so that the vectors stay as long as real words rather
    than growing to wherever the loss pushes them. Returns the bank and per-iteration loss curves.
    """
    initial = random_prompt_bank(encoder, real_words, num_styles, seed).vectors
    vectors = torch.nn.Parameter(initial.to(encoder.device))
    max_norm = None if params.max_norm_ratio is None else params.max_norm_ratio * real_words.median_norm
    style_texts = [" ".join(template.format(style=PLACEHOLDER, class_name="").split())] * num_styles
    content_texts = [template.format(style=PLACEHOLDER, class_name=name) for _ in range(num_styles) for name in classes]
    targets = torch.arange(len(classes), device=encoder.device).repeat(num_styles)
    with torch.no_grad():
        class_features = F.normalize(encoder.encode(list(classes)), dim=-1)
    optimizer = torch.optim.Adam([vectors], lr=params.learning_rate)
    history: dict[str, list[dict[str, float]]] = {
        name: [] for name in ("style_loss", "content_loss", "total_loss", "content_accuracy")
    }
    for step in track(range(params.iterations), params.iterations, "Learning contrastive prompts"):
        style_loss = style_diversity_loss(encoder.encode(style_texts, vectors))
        content_vectors = vectors.repeat_interleave(len(classes), dim=0)
        content_features = F.normalize(encoder.encode(content_texts, content_vectors), dim=-1)
        logits = content_features @ class_features.T / params.temperature
        content_loss = F.cross_entropy(logits, targets)
        total = params.style_weight * style_loss + params.content_weight * content_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if max_norm is not None:
            limit_norms_(vectors, max_norm)
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
    details = {"template": template, **params.model_dump(exclude={"bank_path"}), "max_norm": max_norm}
    return StyleBank.create("contrastive", encoder, vectors.detach(), details), history


def norm_ratio_summary(bank: StyleBank, real_words: RealWordRows) -> dict[str, Any]:
    """How long the bank's vectors are against real words (:meth:`RealWordRows.norm_ratios`):
    the mean, the largest and each vector's ratio, and the median norm they are divided by."""
    ratios = real_words.norm_ratios(bank.vectors)
    return {
        "mean": float(ratios.mean()),
        "max": float(ratios.max()),
        "per_vector": [round(float(ratio), 4) for ratio in ratios],
        "real_word_median_norm": real_words.median_norm,
    }


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
