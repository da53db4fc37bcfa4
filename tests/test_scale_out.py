"""Synthesis beyond one process: shards that split one dataset between runs, and Ray actors
that render the same bytes as this process does."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import ray
import torch
from conftest import StagedDemoProject

from clip_dfkd.naming import shard_of
from clip_dfkd.params import ImageSynthesisParams, InvalidParameterError
from clip_dfkd.pipelines.image_synthesis.nodes import select_shard

pytestmark = pytest.mark.heavy

IMAGES = "data/03_primary/synthetic_images"
MANIFEST = "data/03_primary/synthesis_manifest.parquet"


def _files(project: Path) -> dict[str, bytes]:
    root = project / IMAGES
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.png"))}


# Random pseudo-words (so Ray workers need the style bank), 4 classes x 3 styles x 1 image.
PROMPTS = {"method": "random", "images_per_class_and_style": 1}


@pytest.fixture(scope="module")
def project(new_project):
    path = new_project("scale_out")
    with contextlib.chdir(path):
        yield StagedDemoProject(path)


def _render(
    project: StagedDemoProject, synthesis: dict, *, pipelines: list[str], to_outputs: list[str] | None = None
) -> None:
    params = {"prompt_generation": PROMPTS, "image_synthesis": {"batch_size": 2, **synthesis}}
    with project.session(runtime_params=params) as session:
        session.run(pipeline_names=pipelines, to_outputs=to_outputs)


def test_shards_are_disjoint_cover_the_plan_and_do_not_move() -> None:
    plan = pd.DataFrame({"image_id": [f"class-{n % 7}/prompt-{n:04d}-abcd" for n in range(500)]})
    shards = [select_shard(plan, 3, k) for k in range(3)]
    ids = [set(shard["image_id"]) for shard in shards]
    assert sum(map(len, ids)) == 500 and set().union(*ids) == set(plan["image_id"])
    assert all(120 < len(shard) < 210 for shard in shards)  # a hash, not a slice: shares are even
    # An image keeps its shard when the plan grows (the hash sees only its own id).
    added = "class-9/prompt-9999-ffff"
    grown = pd.concat([plan, pd.DataFrame({"image_id": [added]})], ignore_index=True)
    for k in range(3):
        assert set(select_shard(grown, 3, k)["image_id"]) == ids[k] | ({added} if shard_of(added, 3) == k else set())
    # The same in every process and Python version (sha256, not the per-process salted hash()).
    assert [shard_of("ball/ball-photo-0000-1a2b3c4d", n) for n in (2, 3, 8)] == [0, 2, 4]


@pytest.mark.parametrize(
    ("synthesis", "message"),
    [
        ({"num_shards": 0}, "image_synthesis.num_shards=0: Input should be greater than 0"),
        (
            {"num_shards": 4, "shard_index": 4},
            "image_synthesis.shard_index=4: outside [0, 4) for num_shards=4; allowed: 0..3",
        ),
        ({"shard_index": -1}, "image_synthesis.shard_index=-1: Input should be greater than or equal to 0"),
    ],
)
def test_bad_shard_settings_fail_in_one_line(synthesis, message) -> None:
    with pytest.raises(InvalidParameterError) as error:
        ImageSynthesisParams.model_validate({"backend": "inversion", **synthesis})
    assert str(error.value) == message


def test_shard_runs_write_disjoint_parts_of_one_dataset_that_a_last_run_gathers(project) -> None:
    _render(project, {}, pipelines=["prompt_generation"])
    for k in range(2):
        shard = {"num_shards": 2, "shard_index": k}
        _render(project, shard, pipelines=["image_synthesis"], to_outputs=["synthetic_images"])
        if k == 0:
            first = _files(project.path)
    shard_files = _files(project.path)
    assert 0 < len(first) < len(shard_files) == 12
    assert not (project.path / MANIFEST).exists()  # shard runs render only
    written = {path: path.stat().st_mtime_ns for path in (project.path / IMAGES).rglob("*.png")}

    _render(project, {}, pipelines=["image_synthesis"])  # the gathering run: renders nothing, writes the manifest
    manifest = pd.read_parquet(project.path / MANIFEST)
    assert sorted(f"{image_id}.png" for image_id in manifest["image_id"]) == sorted(shard_files)
    assert {path: path.stat().st_mtime_ns for path in written} == written
    gathering = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"]).iloc[0]
    assert pd.isna(gathering["tags.synthesis_shard"])
    assert (gathering["metrics.synthesis/rendered_images"], gathering["metrics.synthesis/render_seconds"]) == (0, 0)

    # Rendered in one run instead of two shards: the same files, byte for byte.
    shutil.rmtree(project.path / IMAGES)
    _render(project, {}, pipelines=["image_synthesis"], to_outputs=["synthetic_images"])
    assert _hashes(_files(project.path)) == _hashes(shard_files)

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.synthesis_shard_group != ''")
    assert sorted(runs["tags.synthesis_shard"]) == ["0/2", "1/2"]
    assert runs["tags.synthesis_shard_group"].nunique() == 1
    assert all("shard" in name for name in runs["tags.mlflow.runName"])


def test_a_sharded_run_of_more_than_rendering_is_refused_in_one_line(project) -> None:
    from clip_dfkd.preflight import PreflightError

    with pytest.raises(PreflightError) as error:
        _render(project, {"num_shards": 2, "shard_index": 1}, pipelines=["image_synthesis"])
    # The run's own parameters, with (and then without) the shard's. (One line per problem: a
    # missing prompt table would be another.)
    prompts = "prompt_generation.images_per_class_and_style=1,prompt_generation.method=random"
    synthesis = "image_synthesis.inversion.iterations=10,image_synthesis.batch_size=2"
    student = (
        "student_distillation.student.model_name=test_resnet,student_distillation.training.epochs=2,"
        "student_distillation.registry.export_onnx=false"
    )
    shard = "image_synthesis.num_shards=2,image_synthesis.shard_index=<k>"
    assert (
        "image_synthesis.num_shards=2: a sharded run renders synthetic_images only; run `kedro run --env=demo "
        "--pipelines=image_synthesis --to-outputs=synthetic_images "
        f"--params='{prompts},{synthesis},{shard},{student}'` for each k, then `kedro run --env=demo "
        f"--pipelines=image_synthesis --params={prompts},{synthesis},{student}` once, which finds every image on "
        "disk and writes the manifest"
    ) in str(error.value).splitlines()


@pytest.mark.parametrize("backend", ["diffusion", "inversion"])
def test_two_ray_workers_render_the_bytes_this_process_renders(project, backend) -> None:
    # Prompts made for this backend's text encoder (the generator's, or the teacher's).
    stages = {"pipelines": ["prompt_generation", "image_synthesis"], "to_outputs": ["synthetic_images"]}
    synthesis = {"backend": backend, "inversion": {"iterations": 10}}
    shutil.rmtree(project.path / IMAGES, ignore_errors=True)
    # Each actor computes on one thread (Ray sets OMP_NUM_THREADS to its num_cpus), and a CPU
    # sums in a different order on a different number of threads: inversion's 10 Adam steps
    # turn that last-bit difference into a pixel. The same thread count here, then.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _render(project, synthesis, **stages)
    finally:
        torch.set_num_threads(threads)
    local = _files(project.path)
    shutil.rmtree(project.path / IMAGES)
    # The last batch (2 images) on disk already: Ray is never asked for it, and must still stop.
    for name in sorted(local)[-2:]:
        (project.path / IMAGES / name).parent.mkdir(parents=True, exist_ok=True)
        (project.path / IMAGES / name).write_bytes(local[name])

    # As `kedro run` has it (clip_dfkd.cli): SIGTERM ends the MLflow run as KILLED.
    def run_sigterm_handler(signum, frame) -> None:
        raise AssertionError("only a signal calls this")

    previous = signal.signal(signal.SIGTERM, run_sigterm_handler)
    try:
        _render(project, {**synthesis, "executor": "ray", "ray": {"num_actors": 2, "num_gpus_per_actor": 0}}, **stages)
        assert signal.getsignal(signal.SIGTERM) is run_sigterm_handler  # not ray.init's
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert not ray.is_initialized()  # the local Ray the run started, and its actors, are gone
    assert len(local) == 12
    # The same files, byte for byte: pixels and records (no wall-clock time in them).
    assert _hashes(_files(project.path)) == _hashes(local)


def _hashes(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_ray_address_that_does_not_answer_fails_in_one_line(project) -> None:
    from clip_dfkd.preflight import PreflightError

    port = _closed_port()
    with pytest.raises(PreflightError) as error:
        _render(project, {"executor": "ray", "ray": {"address": f"127.0.0.1:{port}"}}, pipelines=["image_synthesis"])
    assert (
        f"image_synthesis.ray.address='127.0.0.1:{port}': nothing answers there (Connection refused); "
        "start the cluster or fix the address"
    ) in str(error.value).splitlines()


def test_ray_executor_without_ray_installed_fails_in_one_line(monkeypatch) -> None:
    from clip_dfkd.params import RayExecutorParams
    from clip_dfkd.rendering import ray_executor_problem

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without Ray
    assert ray_executor_problem(RayExecutorParams()) == (
        "image_synthesis.executor='ray': Ray is not installed; allowed: pip install -e '.[ray]', or executor local"
    )


def test_a_ray_address_for_ray_client_without_it_installed_fails_in_one_line(monkeypatch) -> None:
    from clip_dfkd.params import RayExecutorParams
    from clip_dfkd.rendering import ray_executor_problem

    monkeypatch.setitem(sys.modules, "grpc", None)  # what `import grpc` sees without ray[client]
    address = f"ray://127.0.0.1:{_closed_port()}"
    assert ray_executor_problem(RayExecutorParams(address=address)) == (
        f"image_synthesis.ray.address='{address}': a ray:// address connects through Ray Client, which is not "
        "installed (no module 'grpc'); allowed: pip install 'ray[client]', or the cluster's <head>:6379 from a "
        "machine of the cluster"
    )


@contextlib.contextmanager
def _server_answering(answer: bytes) -> Iterator[int]:
    """A port on 127.0.0.1 that accepts one connection and answers what a client sends first
    with ``answer`` (nothing, when empty)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def serve() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(64)
                connection.sendall(answer)
                # Until the client closes (it resets the connection when it left bytes unread).
                with contextlib.suppress(ConnectionResetError):
                    connection.recv(64)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield server.getsockname()[1]
        thread.join(timeout=5)


HTTP2_SETTINGS_FRAME = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    ("answer", "is_ray"),
    [(HTTP2_SETTINGS_FRAME, True), (b"", False), (b"HTTP/1.1 400 Bad Request\r\n\r\n", False)],
    ids=["grpc", "silent", "http1"],
)
def test_a_ray_address_must_answer_as_ray_does(monkeypatch, answer, is_ray) -> None:
    """A firewall that accepts every connection, or a port of something else, is no Ray."""
    from clip_dfkd.params import RayExecutorParams
    from clip_dfkd.rendering import on_ray as rendering

    monkeypatch.setattr(rendering, "RAY_PROBE_SECONDS", 0.5)
    with _server_answering(answer) as port:
        problem = rendering.ray_executor_problem(RayExecutorParams(address=f"127.0.0.1:{port}"))
    assert problem == (
        None
        if is_ray
        else f"image_synthesis.ray.address='127.0.0.1:{port}': something accepts connections there but does not "
        "answer as Ray's gRPC server does; allowed: the address of a running Ray (<head>:6379, the GCS port of "
        "`ray start --head`, or ray://<head>:10001 for Ray Client)"
    )


def test_with_tls_a_ray_address_is_only_connected_to(monkeypatch) -> None:
    """Ray's servers expect a TLS handshake first then: an HTTP/2 preface would get no answer."""
    from clip_dfkd.params import RayExecutorParams
    from clip_dfkd.rendering import on_ray as rendering

    monkeypatch.setenv("RAY_USE_TLS", "1")
    monkeypatch.setattr(rendering, "RAY_PROBE_SECONDS", 0.5)
    with _server_answering(b"") as port:
        assert rendering.ray_executor_problem(RayExecutorParams(address=f"127.0.0.1:{port}")) is None
