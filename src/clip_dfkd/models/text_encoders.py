"""Pseudo-words: vectors in a text encoder's token-embedding space, spliced into prompts.

A prompt such as ``"a [S*] style of a dog"`` is tokenized with a one-token stand-in where
``[S*]`` is; a forward hook on the encoder's token-embedding layer then replaces the stand-in's
embedding with the pseudo-word vector, and the encoder runs unchanged on the spliced sequence
(the textual-inversion mechanism, without adding tokens to the vocabulary). Gradients flow into
the vector, which is what Contrastive-Prompt trains.

Two encoder families share this: Hugging Face ``CLIPTextModel`` (the text encoder of Stable
Diffusion 1.x/2.x pipelines) and open_clip's text tower (the teacher).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from clip_dfkd.models.errors import ModelNotFoundError
from clip_dfkd.models.generator import missing_generator_weights, pretrained_source
from clip_dfkd.params import GeneratorParams
from clip_dfkd.runtime import Runtime

logger = logging.getLogger(__name__)

PLACEHOLDER = "[S*]"
# Any word that the CLIP BPE keeps as one token works as the stand-in; "*" is one, and
# prompts never contain it otherwise.
_STAND_IN = "*"


class PseudoWordEncoder(ABC):
    """A CLIP text encoder that accepts prompts with one ``[S*]`` pseudo-word each."""

    name: str

    def __init__(self, embedding: nn.Embedding, runtime: Runtime | None):
        self.embedding = embedding
        self.runtime = runtime
        bos_word_eos = self.tokenize([_STAND_IN])[0]
        self.placeholder_id = int(bos_word_eos[1])
        self._end_id = int(self.tokenize([""])[0][1])
        if int(bos_word_eos[2]) != self._end_id:
            raise ValueError(f"{self.name}: {_STAND_IN!r} is not a single token for this tokenizer")

    @property
    def dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def token_embeddings(self) -> torch.Tensor:
        """The token-embedding table ``(vocab, dim)``, in float32."""
        return self.embedding.weight.detach().float()

    @property
    def identity(self) -> str:
        """Which token-embedding space this is: a hash of the token table, the same for the same
        weights loaded in any precision on any device (hashed in bfloat16), different for another
        model or a fine-tune that moved its tokens, even at the same width. Computed on each call,
        so that it follows the weights."""
        table = self.embedding.weight.detach().to("cpu", torch.bfloat16).contiguous()
        return hashlib.sha256(table.view(torch.int16).numpy().tobytes()).hexdigest()[:16]

    def word_token_ids(self, word: str) -> list[int]:
        """The BPE token ids of ``word``, without the start and end tokens."""
        ids = self.tokenize([word])[0].tolist()
        tokens = ids[1 : ids.index(self._end_id, 1)]
        if not tokens:
            raise ValueError(f"{word!r} has no tokens")
        return tokens

    def word_embedding(self, word: str) -> torch.Tensor:
        """The embedding of ``word``; a word of several BPE tokens gets their mean."""
        return self.token_embeddings()[torch.tensor(self.word_token_ids(word))].mean(dim=0)

    @contextlib.contextmanager
    def splice(self, vectors: torch.Tensor | None) -> Iterator[None]:
        """While active, each sequence holding the stand-in token gets the next vector of
        ``vectors`` (in batch order) as that token's embedding; other sequences are unchanged."""
        if vectors is None:
            yield
            return

        def replace(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            at_placeholder = inputs[0] == self.placeholder_id
            if not bool(at_placeholder.any()):
                return output  # e.g. the negative prompt, encoded through the same layer
            rows = at_placeholder.nonzero()[:, 0]
            if len(rows) != len(vectors) or len(rows.unique()) != len(rows):
                raise ValueError(
                    f"{len(vectors)} pseudo-word vectors for {len(rows)} placeholders in "
                    f"{len(rows.unique())} prompts; each prompt takes exactly one {PLACEHOLDER}"
                )
            spliced = output.clone()
            spliced[at_placeholder] = vectors.to(device=output.device, dtype=output.dtype)
            return spliced

        handle = self.embedding.register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def stand_in(self, texts: Sequence[str]) -> list[str]:
        """``texts`` with ``[S*]`` replaced by the one-token stand-in the splice looks for."""
        return [text.replace(PLACEHOLDER, _STAND_IN) for text in texts]

    def encode(self, texts: Sequence[str], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text features (float32) of ``texts``; ``vectors`` fill their ``[S*]`` in order.

        Runs in the runtime's mixed precision (weights and ``vectors`` stay float32, so
        Contrastive-Prompt's updates do too). Differentiable with respect to ``vectors``.
        """
        ids = self.tokenize(self.stand_in(texts)).to(self.device)
        autocast = self.runtime.autocast() if self.runtime is not None else contextlib.nullcontext()
        with self.splice(vectors), autocast:
            return self.pooled_features(ids).float()

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(batch, context)``, starting with the start token."""

    @abstractmethod
    def pooled_features(self, ids: torch.Tensor) -> torch.Tensor:
        """The encoder's sentence feature for each sequence of ``ids``."""


class HFCLIPTextEncoder(PseudoWordEncoder):
    """A ``transformers.CLIPTextModel`` with its ``CLIPTokenizer`` (Stable Diffusion's encoder)."""

    def __init__(self, text_encoder: nn.Module, tokenizer, name: str, runtime: Runtime | None = None):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.name = name
        super().__init__(text_encoder.get_input_embeddings(), runtime)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def pooled_features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids).pooler_output


class OpenClipTextEncoder(PseudoWordEncoder):
    """open_clip's text tower (the teacher's encoder); features are CLIP's projected text embeddings."""

    def __init__(self, model: nn.Module, tokenizer, name: str, runtime: Runtime | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        tower = model if hasattr(model, "token_embedding") else model.text
        super().__init__(tower.token_embedding, runtime)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def pooled_features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)


def load_generator_text_encoder(params: GeneratorParams, runtime: Runtime) -> HFCLIPTextEncoder:
    """Only the tokenizer and text encoder of a diffusers pipeline (no UNet, no VAE)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if problem := missing_generator_weights(params):
        raise ModelNotFoundError(problem)
    source = pretrained_source(params.model_id)
    logger.info("Loading the text encoder of %s", params.model_id)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=params.revision)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", revision=params.revision, variant=params.variant
        )
    except OSError as exc:
        raise ModelNotFoundError(
            f"image_synthesis.generator.model_id={params.model_id!r}: no CLIP tokenizer/text_encoder "
            f"subfolders could be loaded ({str(exc).splitlines()[0]}); pseudo-word prompts need a "
            "Stable Diffusion 1.x/2.x-style pipeline"
        ) from exc
    text_encoder.to(runtime.device).eval().requires_grad_(False)
    return HFCLIPTextEncoder(text_encoder, tokenizer, f"{params.model_id}/text_encoder", runtime)


def generator_embedding_dim(params: GeneratorParams) -> int | None:
    """The token-embedding size of the generator's text encoder, read from its config alone;
    None when the config cannot be found here."""
    from transformers import CLIPTextConfig

    try:
        config = CLIPTextConfig.from_pretrained(
            pretrained_source(params.model_id), subfolder="text_encoder", revision=params.revision
        )
    except OSError:
        return None
    return config.hidden_size
