"""The registry with real processes: SIGKILL mid-publish, peak memory against a fresh process, the CLI, `up`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from services.errors import DuplicateVariantError
from services.rpc.artifact_client import GrpcArtifactSource
from services.updates.model_fetcher import ModelFetcher
from services.updates.tuf_client import TufClient
from tests.support.onnx_models import linear_model, mlp_model, tiny_char_lm
from tests.support.processes import wait_for_file
from tests.support.registry import VOCAB, DirectorySource, new_registry, publish_lm
from tier2_region.registry.model_inspection import inspect_model
from tier2_region.registry.pipeline import PipelineOptions, ValidationChoice, prepare
from tier2_region.registry.profiler import ProfileSettings
from tier2_region.registry.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _committed_versions(registry_dir: Path, state: Path) -> set[str]:
    """What a TUF client sees: the model versions in the verified targets metadata."""
    registry = ModelRegistry(registry_dir)
    client = TufClient(DirectorySource(registry.repository_dir), state, registry.repository.trusted_root())
    registry.close()
    client.refresh()
    targets = json.loads((state / "targets.json").read_bytes())["signed"]["targets"]
    return {path.split("/")[2] for path in targets}


@pytest.mark.slow
@pytest.mark.parametrize("step", ["pending", "blobs", "targets", "snapshot", "timestamp"])
def test_sigkill_in_the_middle_of_publish_leaves_a_valid_repository(tmp_path: Path, step: str) -> None:
    kit = new_registry(tmp_path)
    publish_lm(kit)
    kit.registry.close()
    with subprocess.Popen(
        [sys.executable, "-m", "tests.support.publish_probe", str(tmp_path), step],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as probe:
        assert probe.stdout is not None
        line = probe.stdout.readline()
        assert line.strip() == f"at {step}", line + probe.stdout.read()
        probe.send_signal(signal.SIGKILL)
        probe.wait(10)
    committed = step == "timestamp"  # the timestamp replacement is the commit point
    assert _committed_versions(kit.registry.directory, tmp_path / "client") == ({"1", "2"} if committed else {"1"})
    registry = ModelRegistry(kit.registry.directory)
    published, dropped = registry.reconcile()  # the dead publisher's lock is gone: this does not block
    if step == "pending" or not committed:
        assert published == [] and len(dropped) == 2
    else:
        assert dropped == [] and len(published) == 2
    registry.close()
    kit.registry = ModelRegistry(kit.registry.directory)
    if committed:
        with pytest.raises(DuplicateVariantError):
            publish_lm(kit, version="2", seed=1)
    else:
        publish_lm(kit, version="2", seed=1)  # the interrupted publish can simply be run again
    assert _committed_versions(kit.registry.directory, tmp_path / "client") == {"1", "2"}


@pytest.mark.slow
def test_profiled_peak_memory_is_within_15_percent_of_a_fresh_process(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "mlp.onnx", width=1024, layers=4, in_dim=64)
    batches = (1, 64)
    options = PipelineOptions(profile=ProfileSettings(batch_sizes=batches, latency_runs=5, latency_budget_s=0.05))
    (sub,) = prepare({"fp32": model}, "fp32", options)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for batch in batches:
        fresh = [
            int(
                subprocess.run(
                    [sys.executable, "-m", "tests.support.fresh_peak", str(model), str(batch), "64"],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                ).stdout
            )
            for _ in range(2)
        ]
        profiled = sub.profile.batch(batch).peak_memory_bytes
        real = sum(fresh) / len(fresh)
        assert abs(profiled - real) <= 0.15 * real, (batch, profiled, fresh)


@pytest.mark.slow
def test_profiling_measures_the_inspected_bytes_even_if_the_file_is_replaced(tmp_path: Path) -> None:
    """Issue 7 #2: the profiling process measures the bytes inspected (and published), not the path again."""
    model = tiny_char_lm(tmp_path / "lm.onnx", vocab=VOCAB, seed=0)
    original = model.read_bytes()
    other = tiny_char_lm(tmp_path / "other.onnx", vocab=VOCAB, seed=5).read_bytes()
    options = PipelineOptions(
        profile=ProfileSettings(batch_sizes=(1,), latency_runs=5, latency_budget_s=0.05),
        validation=ValidationChoice(heldout_docs=["the quick brown fox jumps over the lazy dog. " * 8], rows=100),
    )

    def replace_before_profiling(_name: str) -> None:
        model.write_bytes(other)

    (sub,) = prepare({"fp32": model}, "fp32", options, on_progress=replace_before_profiling)
    assert model.read_bytes() == other
    assert sub.facts.sha256 == hashlib.sha256(original).hexdigest() == sub.profile.file_sha256
    golden = sub.profile.golden

    def outputs(data: bytes) -> np.ndarray[Any, Any]:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["probs"], golden.inputs)[0])

    np.testing.assert_allclose(golden.outputs["probs"], outputs(original), rtol=1e-5, atol=1e-7)
    assert not np.allclose(golden.outputs["probs"], outputs(other), rtol=1e-5, atol=1e-7)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [str(BIN / "edgecascade"), "model", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.mark.slow
def test_the_model_commands_end_to_end(tmp_path: Path) -> None:
    lm = tiny_char_lm(tmp_path / "lm.onnx", vocab=VOCAB, context=8)
    text = tmp_path / "heldout.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n\nreturn the value of the attribute.\n" * 20)
    assert _cli("init", "--registry", "reg", "--keys", "keys", cwd=tmp_path).returncode == 0
    quantized = _cli("quantize", "lm.onnx", cwd=tmp_path)
    assert quantized.returncode == 0, quantized.stdout + quantized.stderr
    assert (tmp_path / "lm.int8.onnx").is_file() and "0." in quantized.stdout
    profiled = _cli("profile", "lm.onnx", "lm.int8.onnx", "--batch-sizes", "1,4", "--text", "heldout.txt", cwd=tmp_path)
    assert profiled.returncode == 0, profiled.stdout + profiled.stderr
    profiles = json.loads((tmp_path / "profiles.json").read_text())["profiles"]
    assert set(profiles) == {inspect_model(lm).sha256, inspect_model(tmp_path / "lm.int8.onnx").sha256}
    publish = ["fp32=lm.onnx", "int8=lm.int8.onnx", "--name", "lm", "--version", "1", "--registry", "reg"]
    published = _cli("publish", *publish, "--keys", "keys", "--profiles", "profiles.json", cwd=tmp_path)
    assert published.returncode == 0, published.stdout + published.stderr
    assert "published models/lm/1/int8" in published.stdout
    listed = _cli("list", "--registry", "reg", cwd=tmp_path)
    assert listed.returncode == 0 and "int8" in listed.stdout and "pass" in listed.stdout
    shown = _cli("show", "lm", "1", "--registry", "reg", "--json", cwd=tmp_path)
    signed = json.loads(shown.stdout)
    assert signed["models/lm/1/int8"]["accuracy"]["validation_source"] == "200 windows of text of heldout.txt" or (
        "heldout.txt" in signed["models/lm/1/int8"]["accuracy"]["validation_source"]
    )
    # Refusals: duplicate, not ONNX, gate failure — each with a message and exit code 2, and no change.
    before = (tmp_path / "reg" / "repository" / "metadata" / "timestamp.json").read_bytes()
    duplicate = _cli("publish", *publish, "--keys", "keys", "--profiles", "profiles.json", cwd=tmp_path)
    assert duplicate.returncode == 2 and "already published" in duplicate.stdout
    (tmp_path / "junk.onnx").write_bytes(b"definitely not onnx")
    junk = _cli("publish", "fp32=junk.onnx", "--name", "junk", "--version", "1", "--registry", "reg", cwd=tmp_path)
    assert junk.returncode == 2 and "junk.onnx is not an ONNX model" in junk.stdout
    linear_model(tmp_path / "a.onnx", seed=0)
    linear_model(tmp_path / "b.onnx", seed=1)
    gated = _cli(
        "publish", "int8=a.onnx", "--name", "lin", "--version", "1", "--reference-file", "b.onnx",
        "--batch-sizes", "1,4", "--rows", "300", "--registry", "reg", "--keys", "keys", cwd=tmp_path,
    )  # fmt: skip
    assert gated.returncode == 2, gated.stdout + gated.stderr
    assert "fails the quantization gate" in gated.stdout and "Nothing was published" in gated.stdout
    assert (tmp_path / "reg" / "repository" / "metadata" / "timestamp.json").read_bytes() == before


@pytest.mark.slow
def test_up_publishes_the_demo_models_and_the_edge_serves_them(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("charlm-device", "charlm-edge"):
        fp32 = tiny_char_lm(models / f"{name}.onnx", vocab=VOCAB, context=8)
        from tier2_region.registry.quantization import quantize

        quantize(fp32, models / f"{name}.int8.onnx")
    state = tmp_path / "state"
    command = [str(BIN / "edgecascade"), "up", "--state-dir", str(state), "--models-dir", str(models), "--devices", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as up:
        try:
            wait_for_file(state / "endpoints.json", up, 180)
            endpoints = json.loads((state / "endpoints.json").read_text())
            root = (state / "trusted-root.json").read_bytes()  # what the edge and the devices trust
            source = GrpcArtifactSource(endpoints["edge"], timeout_s=300.0)
            fetcher = ModelFetcher(source, root, tmp_path / "device", "the edge's artifact service")
            target = fetcher.resolve("charlm-device", "1", "int8")
            assert target.custom["gate"]["passed"] is True
            assert fetcher.download(target).path.stat().st_size == target.length
            source.close()
            keys = state / "region-1" / "keys"
            assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in keys.iterdir())
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(60)
        output = up.stdout.read().decode() if up.stdout else ""
    assert code == 0, output
    assert "registry: published models/charlm-device/1/int8" in output
    assert "registry: published models/charlm-edge/1/fp32" in output
