"""Rendering on Ray actors, and whether a Ray can be reached at all (checked before a run
starts, :mod:`clip_dfkd.preflight`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from PIL import Image

from clip_dfkd.models import PROJECT_LOADERS, ModelLoaders
from clip_dfkd.params import ImageSynthesisParams, RayExecutorParams, RuntimeParams, TeacherParams
from clip_dfkd.rendering.executors import OnDemandImages
from clip_dfkd.rendering.records import RenderTiming
from clip_dfkd.rendering.renderers import RenderedBatch, Renderer, create_renderer
from clip_dfkd.styles import StyleBank

logger = logging.getLogger(__name__)


class _RayRenderActor:
    """One renderer (one generator, or one teacher for inversion) per Ray actor."""

    def __init__(self, create: Callable[[], Renderer], batches: list[list[str]]):
        self._renderer = create()
        self._batches = batches

    def __call__(self, items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns: dict[str, list] = {"batch": [], "pixels": [], "record": [], "seconds": []}
        for batch in items["batch"].tolist():
            rendered = self._renderer.render(self._batches[batch])
            for image, record in zip(rendered.images, rendered.records, strict=True):
                columns["batch"].append(batch)
                columns["pixels"].append(np.asarray(image.convert("RGB")))
                columns["record"].append(json.dumps(record))
                columns["seconds"].append(rendered.seconds / len(rendered.images))
        return {name: np.stack(values) if name == "pixels" else np.asarray(values) for name, values in columns.items()}


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
        timing: RenderTiming,
        loaders: ModelLoaders = PROJECT_LOADERS,
    ):
        super().__init__(list(manifest["image_id"]), params.batch_size, timing)
        self._worker_inputs = (manifest, style_bank, params, runtime, teacher, loaders)
        self._ray = params.ray
        self._stream: Iterator[tuple[int, RenderedBatch]] | None = None
        self._started_ray = False

    def _render_batch(self, batch: int) -> RenderedBatch:
        if self._stream is None:
            self._stream = self._start(batch)
        for arrived, rendered in self._stream:
            if arrived == batch:
                if batch == len(self._batches) - 1:
                    self._stop()
                return rendered
        self._stop()
        raise RuntimeError(f"Ray returned no images for batch {batch} ({self._batches[batch][0]}, ...)")

    def _start(self, first_batch: int) -> Iterator[tuple[int, RenderedBatch]]:
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
    def _by_batch(rows: Iterator[dict[str, Any]]) -> Iterator[tuple[int, RenderedBatch]]:
        current, rendered = None, RenderedBatch([], [], 0.0)
        for row in rows:
            batch = int(row["batch"])
            if current is not None and batch != current:
                yield current, rendered
                rendered = RenderedBatch([], [], 0.0)
            current = batch
            rendered.images.append(Image.fromarray(np.asarray(row["pixels"])))
            rendered.records.append(json.loads(row["record"]))
            rendered.seconds += float(row["seconds"])
        if current is not None:
            yield current, rendered

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
