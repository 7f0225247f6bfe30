"""The committed generated code is exactly what the pinned generator produces."""

from __future__ import annotations

from pathlib import Path

from protos.regenerate import REPO_ROOT, generate, proto_files


def test_every_generated_file_matches_a_fresh_generation(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "protos").rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "protos").rglob("*_pb2*.py*"))
    assert fresh == committed, "generated file set differs; run `make protos`"
    assert len(fresh) == 3 * len(proto_files())
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (REPO_ROOT / rel).read_bytes(), f"{rel} is stale; run `make protos`"


def test_inference_service_uses_tritons_names_and_field_numbers() -> None:
    from protos.inference import grpc_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload",
    }  # fmt: skip
    request = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert request["raw_input_contents"].number == 7
    assert request["parameters"].number == 4
    stream = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name
    assert (stream["error_message"].number, stream["infer_response"].number) == (1, 2)
    response = pb.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert response["raw_output_contents"].number == 6
