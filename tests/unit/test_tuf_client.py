"""The TUF client (ngclient underneath) against a real repository, attacked on disk at the origin."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Timestamp

from services.errors import (
    ArtifactNotFoundError,
    DigestMismatchError,
    IntegrityError,
    InvalidArgumentError,
    MetadataExpiredError,
    MetadataSignatureError,
    StaleVersionError,
    UpstreamUnavailableError,
)
from services.updates.content_encryption import decrypt_artifact
from services.updates.tuf_client import TufClient, check_target_name, domain_error, hashed_target_path, model_target
from tests.support.registry import DirectorySource, FakeClock, RegistryKit, lm_variants, new_registry, publish_lm
from tier2_region.registry.tuf_repository import ExpiryPolicy


@pytest.fixture
def kit(tmp_path: Path) -> RegistryKit:
    kit = new_registry(tmp_path)
    publish_lm(kit)
    return kit


def _client(kit: RegistryKit, state: Path, source: DirectorySource | None = None) -> TufClient:
    source = source or DirectorySource(kit.registry.repository_dir)
    return TufClient(source, state / "metadata", kit.registry.repository.trusted_root(), "test origin")


def _blob_file(kit: RegistryKit, variant: str = "int8") -> Path:
    info = kit.registry.target("lm", "1", variant)
    return kit.registry.repository.targets_dir / hashed_target_path(info)


def test_resolve_and_download_a_verified_variant(kit: RegistryKit, tmp_path: Path) -> None:
    client = _client(kit, tmp_path / "device")
    target = model_target(client.target_info("models/lm/1/int8"))
    assert target.custom["variant"] == "int8" and target.peak_memory_bytes(8) == 12_000_000
    download = client.download(target.info, tmp_path / "device" / "staging")
    assert download.path.name == f"{target.sha256}.blob" and download.resumed_from == 0
    key = kit.registry.database.content_key(str(target.custom["encryption"]["key_id"]))
    assert (
        decrypt_artifact(download.path.read_bytes(), key, target.target_path)
        == lm_variants(kit.files)["int8"].read_bytes()
    )


def test_a_partial_download_resumes_from_its_length(kit: RegistryKit, tmp_path: Path) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    client = _client(kit, tmp_path / "device", source)
    info = client.target_info("models/lm/1/fp32")
    staging = tmp_path / "device" / "staging"
    staging.mkdir(parents=True)
    blob = _blob_file(kit, "fp32").read_bytes()
    (staging / f"{info.hashes['sha256']}.part").write_bytes(blob[:1500])
    download = client.download(info, staging)
    assert download.resumed_from == 1500
    assert download.path.read_bytes() == blob
    assert sorted(p.name for p in staging.iterdir()) == [f"{info.hashes['sha256']}.blob"]


def test_a_flipped_byte_is_refused_and_leaves_nothing(kit: RegistryKit, tmp_path: Path) -> None:
    blob = _blob_file(kit)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    client = _client(kit, tmp_path / "device")
    staging = tmp_path / "device" / "staging"
    with pytest.raises(DigestMismatchError, match="does not match its signed info"):
        client.download(client.target_info("models/lm/1/int8"), staging)
    assert list(staging.iterdir()) == []


def test_a_blob_longer_than_signed_is_cut_off(kit: RegistryKit, tmp_path: Path) -> None:
    blob = _blob_file(kit)
    blob.write_bytes(blob.read_bytes() + b"\x00" * 100_000)
    client = _client(kit, tmp_path / "device")
    staging = tmp_path / "device" / "staging"
    with pytest.raises(DigestMismatchError, match="longer than its signed length"):
        client.download(client.target_info("models/lm/1/int8"), staging)
    assert list(staging.iterdir()) == []


def test_a_replayed_older_timestamp_is_refused(kit: RegistryKit, tmp_path: Path) -> None:
    metadata = kit.registry.repository.metadata_dir
    old = (metadata / "timestamp.json").read_bytes()
    publish_lm(kit, version="2", seed=1)
    client = _client(kit, tmp_path / "device")
    client.refresh()  # trusts timestamp v3 from now on
    (metadata / "timestamp.json").write_bytes(old)
    with pytest.raises(StaleVersionError, match="New timestamp version 2 must be >= 3"):
        _client(kit, tmp_path / "device").refresh()


def test_a_replayed_older_snapshot_is_refused(kit: RegistryKit, tmp_path: Path) -> None:
    metadata = kit.registry.repository.metadata_dir
    publish_lm(kit, version="2", seed=1)
    (metadata / "3.snapshot.json").write_bytes((metadata / "2.snapshot.json").read_bytes())
    with pytest.raises(DigestMismatchError):
        _client(kit, tmp_path / "device").refresh()


def test_expired_metadata_is_refused(tmp_path: Path) -> None:
    clock = FakeClock(datetime.now(UTC) - timedelta(days=2))
    kit = new_registry(tmp_path, clock, ExpiryPolicy(timestamp=timedelta(days=1), resign_margin=timedelta(hours=1)))
    with pytest.raises(MetadataExpiredError, match=r"timestamp\.json is expired"):
        _client(kit, tmp_path / "device").refresh()


def test_metadata_signed_with_the_wrong_key_is_refused(kit: RegistryKit, tmp_path: Path) -> None:
    path = kit.registry.repository.metadata_dir / "timestamp.json"
    forged = Metadata[Timestamp].from_bytes(path.read_bytes())
    forged.signed.version += 1
    forged.sign(CryptoSigner.generate_ed25519())
    path.write_bytes(forged.to_bytes())
    with pytest.raises(MetadataSignatureError, match="timestamp was signed by 0/1 keys"):
        _client(kit, tmp_path / "device").refresh()


def test_a_target_the_metadata_does_not_list_is_not_found(kit: RegistryKit, tmp_path: Path) -> None:
    client = _client(kit, tmp_path / "device")
    with pytest.raises(ArtifactNotFoundError, match="not listed in the signed targets"):
        client.target_info("models/lm/9/int8")


def test_the_root_rotation_walk_ends_on_not_found(kit: RegistryKit, tmp_path: Path) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    _client(kit, tmp_path / "device", source).refresh()
    assert source.requests["metadata/2.root.json"] == 1  # asked, told "does not exist", carried on
    assert json.loads((tmp_path / "device" / "metadata" / "timestamp.json").read_bytes())["signed"]["version"] == 2


@pytest.mark.parametrize(
    "digest",
    ["../../escaped", "A" * 64, "a" * 63, "a" * 65, "a" * 64 + "\n", "g" * 64, "a" * 32 + "/" + "a" * 31],
)
def test_a_signed_sha256_that_is_not_64_lowercase_hex_never_becomes_a_file_name(
    kit: RegistryKit, tmp_path: Path, digest: str
) -> None:
    genuine = kit.registry.target("lm", "1", "int8")
    info = TargetFile(genuine.length, {"sha256": digest}, genuine.path, genuine.unrecognized_fields)
    client = _client(kit, tmp_path / "device")
    staging = tmp_path / "device" / "staging"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(IntegrityError, match="not 64 lowercase hex"):
        client.download(info, staging)
    with pytest.raises(IntegrityError, match="not 64 lowercase hex"):
        hashed_target_path(info)
    with pytest.raises(IntegrityError, match="not 64 lowercase hex"):
        model_target(info)
    assert sorted(p for p in tmp_path.rglob("*") if p != staging) == [p for p in before if p != staging]
    assert not staging.exists() or list(staging.iterdir()) == []


@pytest.mark.parametrize("path", ["models/lm\n/1/int8", "models/lm/1/int8\n", "models/lm/1/\x00int8", "models/lm\\1"])
def test_a_target_name_with_control_characters_is_refused(path: str) -> None:
    with pytest.raises(InvalidArgumentError, match="is not a plain relative path"):
        check_target_name(path)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (tuf_errors.ExpiredMetadataError("timestamp.json is expired"), MetadataExpiredError),
        (tuf_errors.BadVersionNumberError("older"), StaleVersionError),
        (tuf_errors.UnsignedMetadataError("1/2 signatures"), MetadataSignatureError),
        (tuf_errors.LengthOrHashMismatchError("hash"), DigestMismatchError),
        (tuf_errors.DownloadLengthMismatchError("long"), DigestMismatchError),
        (tuf_errors.RepositoryError("bad"), IntegrityError),
        (tuf_errors.DownloadHTTPError("gone", 404), ArtifactNotFoundError),
        (tuf_errors.DownloadHTTPError("teapot", 418), UpstreamUnavailableError),
        (tuf_errors.DownloadError("reset"), UpstreamUnavailableError),
        (ValueError("surprise"), IntegrityError),
    ],
)
def test_every_ngclient_error_becomes_one_domain_error(raised: Exception, expected: type[Exception]) -> None:
    error = domain_error(raised, "refreshing TUF metadata from edge")
    assert type(error) is expected
    assert error.message.startswith("refreshing TUF metadata from edge")
