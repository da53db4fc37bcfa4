"""Rendering synthesis manifest rows into images, in this process or on Ray actors.

A renderer turns a list of manifest rows into images, loading its models on first use. The
image synthesis stage hands Kedro one lazy loader per image; :class:`OnDemandImages` serves
those loaders batch by batch, rendering a batch when its first image is asked for, either
here (:class:`LocalImages`) or streamed from Ray actors (:class:`RayImages`). Batches are
fixed slices of the sorted manifest and every image is drawn from its own seed, so a
manifest gives the same pixels whichever executor or Ray worker renders it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clip_dfkd.errors import UserError
from clip_dfkd.models import load_teacher, load_text_to_image
from clip_dfkd.models.generator import load_latent_decoder
from clip_dfkd.models.inversion import invert, start_images
from clip_dfkd.models.text_encoders import HFCLIPTextEncoder, OpenClipTextEncoder
from clip_dfkd.params import ImageSynthesisParams, RayExecutorParams, RuntimeParams, TeacherParams
from clip_dfkd.progress import ProgressBar
from clip_dfkd.runtime import FittingBatches, Runtime
from clip_dfkd.styles import StyleBank

logger = logging.getLogger(__name__)

RECORD_KEY = "clip-dfkd"  # the PNG text chunk that carries an image's synthesis record


class RenderingOutOfMemoryError(UserError, RuntimeError):
    """Not even one image fits on the device; the message says what to change."""


class Renderer:
    """Renders manifest rows (indexed by ``image_id``) into images and, per image, a record
    of its synthesis (prompt, seed, seconds, and what the backend measured)."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        style_bank: StyleBank,
        params: ImageSynthesisParams,
        runtime_params: RuntimeParams,
        teacher_params: TeacherParams,
    ):
        self._rows = manifest.set_index("image_id")
        self._style_bank = style_bank
        self._params = params
        self._runtime_params = runtime_params
        self._teacher_params = teacher_params
        self._loaded = False
        self._fitting = FittingBatches(self._warn_split, lambda: RenderingOutOfMemoryError(self._out_of_memory()))

    def render(self, image_ids: list[str]) -> list[tuple[Image.Image, dict[str, Any]]]:
        if not self._loaded:
            self._load()
            if self._style_bank is not None and self._style_bank.names:
                # A bank made with another encoder of the same width would splice silently.
                self._style_bank.check_encoder(self._encoder, "style_bank")
            self._loaded = True
        # A batch that does not fit is rendered half as many at a time, which later batches
        # keep to; every image has its own seed, so the images are the same up to rounding.
        return self._fitting.run(image_ids, self._render_rows, lambda parts: sum(parts, []))

    def _warn_split(self, tried: int, fits: int) -> None:
        logger.warning(
            "image_synthesis: %d images at once do not fit in device memory; rendering %d at a time "
            "(image_synthesis.batch_size is %d)",
            tried,
            fits,
            self._params.batch_size,
        )

    def _render_rows(self, image_ids: list[str]) -> list[tuple[Image.Image, dict[str, Any]]]:
        rows = self._rows.loc[image_ids]
        started = time.perf_counter()
        images, measured = self._render(rows)
        seconds = (time.perf_counter() - started) / len(image_ids)
        records = [
            {"image_id": row.Index, "prompt": row.prompt, "seed": int(row.seed), "render_seconds": seconds, **extra}
            for row, extra in zip(rows.itertuples(), measured, strict=True)
        ]
        return list(zip(images, records, strict=True))

    def _out_of_memory(self) -> str:
        params = self._params
        if params.backend == "inversion":
            inversion = params.inversion
            return (
                f"image_synthesis: out of device memory rendering a single image (inversion); lower "
                f"image_synthesis.inversion.cutouts (now {inversion.cutouts}) or image_synthesis.inversion.image_size "
                f"(now {inversion.image_size})"
            )
        generator = params.generator
        options = [f"image_synthesis.generator.{name}=true" for name in ("vae_slicing",) if not generator.vae_slicing]
        if generator.tiny_vae is None:
            options.append("image_synthesis.generator.tiny_vae (e.g. madebyollin/taesd)")
        settings = f"set {' or '.join(options)}, or " if options else ""
        return (
            f"image_synthesis: out of device memory rendering a single image (diffusion); {settings}lower "
            f"image_synthesis.generator.height/width (now {generator.height}x{generator.width})"
        )

    def _style_vectors(self, rows: pd.DataFrame) -> torch.Tensor | None:
        vector_ids = rows["style_vector_id"].dropna()
        return self._style_bank.lookup(list(vector_ids)) if len(vector_ids) else None

    def _load(self) -> None:
        raise NotImplementedError

    def _render(self, rows: pd.DataFrame) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        """The rows' images and, per image, what its synthesis measured."""
        raise NotImplementedError


class DiffusionRenderer(Renderer):
    """A diffusers text-to-image pipeline, conditioned on each row's prompt embedding."""

    def _load(self) -> None:
        self._pipeline = load_text_to_image(self._params.generator, Runtime.resolve(self._runtime_params))
        self._encoder = HFCLIPTextEncoder(self._pipeline.text_encoder, self._pipeline.tokenizer, "generator")

    def _render(self, rows: pd.DataFrame) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        generator = self._params.generator
        guided = generator.guidance_scale > 1
        # The pipeline's own prompt encoding, with each row's pseudo-word spliced in; the
        # result goes in as embeddings, so "[S*]" never reaches the pipeline as text.
        with torch.no_grad(), self._encoder.splice(self._style_vectors(rows)):
            prompt_embeds, negative_prompt_embeds = self._pipeline.encode_prompt(
                prompt=self._encoder.stand_in(list(rows["prompt"])),
                device=self._pipeline.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=[generator.negative_prompt] * len(rows) if guided else None,
            )
        images = self._pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_inference_steps=generator.num_inference_steps,
            guidance_scale=generator.guidance_scale,
            height=generator.height,
            width=generator.width,
            # CPU generators give the same starting noise on every device.
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in rows["seed"]],
        ).images
        return images, [{} for _ in images]


class InversionRenderer(Renderer):
    """Teacher-guided inversion: each row's image optimised until the teacher sees its prompt
    (pseudo-words spliced into the teacher's own text tower)."""

    def _load(self) -> None:
        inversion = self._params.inversion
        runtime = Runtime.resolve(self._runtime_params)
        self._teacher = load_teacher(self._teacher_params, runtime)
        self._decoder = (
            load_latent_decoder(inversion.decoder, runtime) if inversion.parameterization == "latent" else None
        )
        self._encoder = OpenClipTextEncoder(self._teacher.model, self._teacher.tokenizer, self._teacher.name, runtime)

    def _render(self, rows: pd.DataFrame) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        teacher = self._teacher
        with torch.no_grad():
            text = self._encoder.encode(list(rows["prompt"]), self._style_vectors(rows))
        start, generators = start_images(self._params.inversion, list(rows["seed"]), self._decoder)
        visual = teacher.model.visual

        def encode_image(pixels: torch.Tensor) -> torch.Tensor:
            with teacher.runtime.autocast():
                return teacher.model.encode_image(pixels)

        result = invert(
            encode_image,
            text,
            start,
            generators,
            self._params.inversion,
            input_size=visual.image_size[0] if isinstance(visual.image_size, tuple | list) else visual.image_size,
            mean=visual.preprocess_cfg["mean"],
            std=visual.preprocess_cfg["std"],
        )
        images = [Image.fromarray(pixels.numpy()) for pixels in result.images]
        records = [
            {
                "inversion_loss": float(result.losses[row]),
                "inversion_loss_curve": dict(
                    zip(result.logged_iterations, result.loss_history[:, row].tolist(), strict=True)
                ),
            }
            for row in range(len(images))
        ]
        return images, records


_RENDERERS: dict[str, type[Renderer]] = {"diffusion": DiffusionRenderer, "inversion": InversionRenderer}


def create_renderer(
    manifest: pd.DataFrame,
    style_bank: StyleBank,
    params: ImageSynthesisParams,
    runtime: RuntimeParams,
    teacher: TeacherParams,
) -> Renderer:
    """The backend's renderer; it loads its models (the generator, or the teacher for
    inversion) when it first renders, and they go when it goes."""
    return _RENDERERS[params.backend](manifest, style_bank, params, runtime, teacher)


def attach_record(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    # Pillow writes an image's own ``encoderinfo`` when it saves it: the record travels with
    # the image through the partitioned dataset into a PNG text chunk.
    text = PngInfo()
    text.add_text(RECORD_KEY, json.dumps(record))
    image.encoderinfo = {"pnginfo": text}
    return image


def read_record(image: Image.Image) -> dict[str, Any]:
    return _record(image.info)


def read_saved_record(load: Callable[[], Image.Image]) -> dict[str, Any]:
    """The record of a saved image, given its loader: one that reads the file's metadata alone
    (:meth:`clip_dfkd.datasets.ImageFileLoader.metadata`) decodes no pixel."""
    metadata = getattr(load, "metadata", None)
    return _record(metadata() if metadata is not None else load().info)


def _record(info: dict[str, Any]) -> dict[str, Any]:
    text = info.get(RECORD_KEY)
    return json.loads(text) if text else {}


class OnDemandImages:
    """Serves one image at a time, rendering the batch it belongs to when it is first asked for.

    Kedro saves the image partitions in sorted id order and calls one lazy loader per
    missing image; a batch's first call renders the whole batch, the rest are served from
    memory. Nothing is loaded or started until some image is actually missing.
    """

    def __init__(self, image_ids: list[str], batch_size: int):
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
                for image_id, (image, record) in zip(self._batches[batch], rendered, strict=True)
            }
            self._progress.update(len(rendered))
        return self._rendered.pop(image_id)

    def _render_batch(self, batch: int) -> list[tuple[Image.Image, dict[str, Any]]]:
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

    def __init__(self, renderer: Renderer, image_ids: list[str], batch_size: int):
        super().__init__(image_ids, batch_size)
        self._renderer = renderer

    def _render_batch(self, batch: int) -> list[tuple[Image.Image, dict[str, Any]]]:
        return self._renderer.render(self._batches[batch])

    def close(self) -> None:
        super().close()
        self._renderer = None  # with it, the generator or teacher it loaded


class _RayRenderActor:
    """One renderer (one generator, or one teacher for inversion) per Ray actor."""

    def __init__(self, create: Callable[[], Renderer], batches: list[list[str]]):
        self._renderer = create()
        self._batches = batches

    def __call__(self, items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns: dict[str, list] = {"batch": [], "pixels": [], "record": []}
        for batch in items["batch"].tolist():
            for image, record in self._renderer.render(self._batches[batch]):
                columns["batch"].append(batch)
                columns["pixels"].append(np.asarray(image.convert("RGB")))
                columns["record"].append(json.dumps(record))
        return {
            "batch": np.asarray(columns["batch"]),
            "pixels": np.stack(columns["pixels"]),
            "record": np.asarray(columns["record"]),
        }


class RayImages(OnDemandImages):
    """Renders on Ray actors (Ray Data ``map_batches``, one render batch per task), streamed
    back in manifest order.

    The first image asked for starts one job over its batch and every later one; batches
    whose images turn out to be on disk already (never asked for) are dropped on arrival.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        style_bank: StyleBank,
        params: ImageSynthesisParams,
        runtime: RuntimeParams,
        teacher: TeacherParams,
    ):
        super().__init__(list(manifest["image_id"]), params.batch_size)
        self._worker_inputs = (manifest, style_bank, params, runtime, teacher)
        self._ray = params.ray
        self._stream: Iterator[tuple[int, list[tuple[Image.Image, dict[str, Any]]]]] | None = None
        self._started_ray = False

    def _render_batch(self, batch: int) -> list[tuple[Image.Image, dict[str, Any]]]:
        if self._stream is None:
            self._stream = self._start(batch)
        for arrived, rendered in self._stream:
            if arrived == batch:
                if batch == len(self._batches) - 1:
                    self._stop()
                return rendered
        self._stop()
        raise RuntimeError(f"Ray returned no images for batch {batch} ({self._batches[batch][0]}, ...)")

    def _start(self, first_batch: int) -> Iterator[tuple[int, list[tuple[Image.Image, dict[str, Any]]]]]:
        import ray

        if not ray.is_initialized():
            # ray.init sets SIGTERM to exit the process (sys.exit): the run's own handler, which
            # ends the MLflow run as KILLED (clip_dfkd.cli), is put back. (Outside the main
            # thread neither can set one.)
            sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(address=self._ray.address, include_dashboard=False, log_to_driver=False)
            if signal.getsignal(signal.SIGTERM) is not sigterm:
                signal.signal(signal.SIGTERM, sigterm)
            self._started_ray = True
        gpus = self._ray.num_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        logger.info(
            "Rendering on %d Ray actor(s) with %g GPU and %g CPU each (Ray at %s)",
            self._ray.num_actors,
            gpus,
            self._ray.num_cpus_per_actor,
            self._ray.address or "this machine",
        )
        context = ray.data.DataContext.get_current()
        # Images come back in manifest order, as Kedro asks for them.
        context.execution_options.preserve_order = True
        todo = list(range(first_batch, len(self._batches)))
        rows = ray.data.from_items([{"batch": n} for n in todo], override_num_blocks=len(todo))
        rendered = rows.map_batches(
            _RayRenderActor,
            fn_constructor_kwargs={
                "create": partial(create_renderer, *self._worker_inputs),
                "batches": self._batches,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=self._ray.num_actors),
            num_gpus=gpus,
            num_cpus=self._ray.num_cpus_per_actor,
        )
        return self._by_batch(rendered.iter_rows())

    @staticmethod
    def _by_batch(rows: Iterator[dict[str, Any]]) -> Iterator[tuple[int, list[tuple[Image.Image, dict[str, Any]]]]]:
        current, images = None, []
        for row in rows:
            batch = int(row["batch"])
            if current is not None and batch != current:
                yield current, images
                images = []
            current = batch
            images.append((Image.fromarray(np.asarray(row["pixels"])), json.loads(row["record"])))
        if current is not None:
            yield current, images

    def close(self) -> None:
        super().close()
        self._stream = None  # ends the Ray Data job, and with it the actors
        self._stop()

    def _stop(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


def ray_executor_problem(params: RayExecutorParams) -> str | None:
    """Why ``image_synthesis.executor: ray`` cannot run here, or None: Ray is not installed, a
    ``ray://`` address without Ray Client, or no Ray answers at ``image_synthesis.ray.address``
    (checked with one quick connection, where ``ray.init`` would wait for minutes)."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return (
            "image_synthesis.executor='ray': Ray is not installed; allowed: pip install -e '.[ray]', or executor local"
        )
    address = params.address
    if address is None or address == "auto":
        return None
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    key = f"image_synthesis.ray.address={address!r}"
    if not parsed.hostname or not parsed.port:
        return f"{key}: not host:port; allowed: null (a Ray on this machine), auto, <head>:6379 or ray://<head>:10001"
    if parsed.scheme == "ray" and (missing := _missing_ray_client()):
        return (
            f"{key}: a ray:// address connects through Ray Client, which is not installed (no module {missing!r}); "
            "allowed: pip install 'ray[client]', or the cluster's <head>:6379 from a machine of the cluster"
        )
    return _ray_answer_problem(key, parsed.hostname, parsed.port)


def _missing_ray_client() -> str | None:
    """The module that Ray Client needs and does not find (``ray[client]`` adds grpcio, which
    Ray imports as ``grpc`` to decide whether the client can run), or None."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        return "grpc"
    return None


# An HTTP/2 client's first bytes: the preface and an empty SETTINGS frame (RFC 9113, 3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4
RAY_PROBE_SECONDS = 5.0


def _ray_answer_problem(key: str, host: str, port: int) -> str | None:
    """Why no Ray answers at ``host:port``, or None. Both of Ray's ports (the GCS of ``ray start
    --head`` and Ray Client's) serve gRPC, which answers an HTTP/2 client's preface with its
    SETTINGS frame; a port that accepts the connection and answers nothing, or something else
    (a dashboard, another service, a firewall that accepts every connection), is no Ray. With
    RAY_USE_TLS the servers expect a TLS handshake first: the connection alone is checked."""
    try:
        connection = socket.create_connection((host, port), timeout=RAY_PROBE_SECONDS)
    except OSError as exc:
        return f"{key}: nothing answers there ({exc.strerror or exc}); start the cluster or fix the address"
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None
        try:
            connection.sendall(_HTTP2_PREFACE)
            header = connection.recv(9)
        except OSError:  # no answer in time, or the connection closed
            header = b""
    if len(header) > 3 and header[3] == _HTTP2_SETTINGS:
        return None
    return (
        f"{key}: something accepts connections there but does not answer as Ray's gRPC server does; allowed: the "
        "address of a running Ray (<head>:6379, the GCS port of `ray start --head`, or ray://<head>:10001 for Ray "
        "Client)"
    )
