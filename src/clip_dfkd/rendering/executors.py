"""Executors: serve a stage's lazy images batch by batch, rendering here
(:class:`LocalImages`) or on Ray actors (:class:`clip_dfkd.rendering.on_ray.RayImages`).

Batches are fixed slices of the sorted manifest and every image is drawn from its own seed,
so a manifest gives the same images whichever executor or Ray worker renders it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from PIL import Image

from clip_dfkd.progress import ProgressBar
from clip_dfkd.rendering.records import RenderTiming, attach_record
from clip_dfkd.rendering.renderers import RenderedBatch, Renderer

logger = logging.getLogger(__name__)


class OnDemandImages:
    """Serves one image at a time, rendering the batch it belongs to when it is first asked for.

    Kedro saves the image partitions in sorted id order and calls one lazy loader per
    missing image; a batch's first call renders the whole batch, the rest are served from
    memory. Nothing is loaded or started until some image is actually missing.
    """

    def __init__(self, image_ids: list[str], batch_size: int, timing: RenderTiming):
        self._timing = timing
        self._batches = [image_ids[i : i + batch_size] for i in range(0, len(image_ids), batch_size)]
        self._batch_of = {image_id: n for n, batch in enumerate(self._batches) for image_id in batch}
        self._rendered: dict[str, Image.Image] = {}
        self._progress: ProgressBar | None = None
        self._to_render = len(image_ids)  # until told which are missing

    def loaders(self) -> LazyImages:
        """One lazy loader per image, keyed by ``image_id``, as Kedro saves them."""
        loaders = {image_id: partial(self.image, image_id) for image_id in self._batch_of}
        return LazyImages(loaders, self.expect, self.close)

    def expect(self, missing: list[str]) -> None:
        """Told which images the save will ask for (the others are on disk): the progress bar
        counts the images of the batches that hold them, which are what will be rendered."""
        batches = {self._batch_of[image_id] for image_id in missing}
        to_render = sum(len(self._batches[batch]) for batch in batches)
        logger.info(
            "%d of the %d planned images are missing: rendering %d (their batches)",
            len(missing),
            len(self._batch_of),
            to_render,
        )
        self._to_render = to_render

    def close(self) -> None:
        """Let go of the models (or Ray workers) once every missing image has been saved;
        the last batch on disk already is never asked for, so this is the only end signal."""
        self._rendered.clear()
        if self._progress is not None:
            self._progress.close()

    def image(self, image_id: str) -> Image.Image:
        if image_id not in self._rendered:
            self._rendered.clear()
            if self._progress is None:
                self._progress = ProgressBar(self._to_render, "Rendering missing images", unit="img")
            batch = self._batch_of[image_id]
            rendered = self._render_batch(batch)
            self._rendered = {
                image_id: attach_record(image, record)
                for image_id, image, record in zip(self._batches[batch], rendered.images, rendered.records, strict=True)
            }
            self._timing.add(len(rendered.images), rendered.seconds)
            self._progress.update(len(rendered.images))
        return self._rendered.pop(image_id)

    def _render_batch(self, batch: int) -> RenderedBatch:
        raise NotImplementedError


class LazyImages(dict):
    """Lazy loaders keyed by ``image_id``, with the two calls the resumable partitioned dataset
    makes when it saves them: ``expect`` with the ids it will load (those not on disk), and
    ``close`` once saved (see :meth:`OnDemandImages.expect` and :meth:`OnDemandImages.close`)."""

    def __init__(
        self,
        loaders: dict[str, Callable[[], Image.Image]],
        expect: Callable[[list[str]], None],
        close: Callable[[], None],
    ):
        super().__init__(loaders)
        self.expect = expect
        self.close = close


class LocalImages(OnDemandImages):
    """Renders in this process."""

    def __init__(self, renderer: Renderer, image_ids: list[str], batch_size: int, timing: RenderTiming):
        super().__init__(image_ids, batch_size, timing)
        self._renderer = renderer

    def _render_batch(self, batch: int) -> RenderedBatch:
        return self._renderer.render(self._batches[batch])

    def close(self) -> None:
        super().close()
        self._renderer = None  # with it, the generator or teacher it loaded
