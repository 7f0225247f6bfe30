"""defaults < TOML file < environment, and clear errors for anything wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import env_name, load_config
from services.errors import ConfigError
from services.tier_config import RuntimeSection, TierConfig


def test_defaults_are_loopback_and_sane() -> None:
    config = load_config(TierConfig, env={})
    assert config.server.host == "127.0.0.1"
    assert config.upstream.address == ""
    assert config.runtime.concurrent_runs >= 1


def test_file_beats_defaults_and_environment_beats_file(tmp_path: Path) -> None:
    path = tmp_path / "tier.toml"
    path.write_text(
        '[server]\nport = 9001\nnode_id = "from-file"\n[repository]\npath = "/srv/models"\npreload = false\n'
    )
    env = {"EDGECASCADE_SERVER__PORT": "9002", "EDGECASCADE_UPSTREAM__ADDRESS": "127.0.0.1:9100"}
    config = load_config(TierConfig, path, env=env, overrides={"server": {"port": 1234, "grace_seconds": 1.5}})
    assert config.server.port == 9002
    assert config.server.node_id == "from-file"
    assert config.server.grace_seconds == 1.5
    assert config.repository.path == Path("/srv/models")
    assert config.repository.preload is False
    assert config.upstream.address == "127.0.0.1:9100"


def test_env_name_convention() -> None:
    assert env_name("server", "max_message_bytes") == "EDGECASCADE_SERVER__MAX_MESSAGE_BYTES"


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[nosuch]\nx = 1\n", {}, "unknown section [nosuch]"),
        ("[server]\nprot = 1\n", {}, "unknown setting [server] prot"),
        ('[server]\nport = "eighty"\n', {}, "expected an integer"),
        ("", {"EDGECASCADE_SERVER__PORT": "eighty"}, "EDGECASCADE_SERVER__PORT"),
        ("", {"EDGECASCADE_SERVER__PORTT": "1"}, "unknown setting [server] portt"),
        ("[server]\nport = 70000\n", {}, "between 0 and 65535"),
        ("", {"EDGECASCADE_REPOSITORY__PRELOAD": "maybe"}, "expected true or false"),
        ("", {"EDGECASCADE_UPSTREAM__ADDRESS": "nohost"}, "host:port"),
        ("", {"EDGECASCADE_RUNTIME__INTRA_OP_THREADS": "4096"}, "exceeds"),
        ("", {"EDGECASCADE_LOG__LEVEL": "LOUD"}, "[log] level"),
        ("[server\n", {}, "not valid TOML"),
        # Node ids travel in gRPC metadata (the forwarding route): ASCII only, no route separator.
        ('[server]\nnode_id = "gerät"\n', {}, "node_id 'gerät' is not valid"),
        ("", {"EDGECASCADE_SERVER__NODE_ID": "a > b"}, "node_id 'a > b' is not valid"),
        ('[server]\nnode_id = "a\\nb"\n', {}, "is not valid"),
        ("", {"EDGECASCADE_REQUESTS__MAX_HOPS": "0"}, "[requests] max_hops must be from 1 to 16"),
    ],
)
def test_bad_configuration_stops_with_a_clear_message(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "tier.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(TierConfig, path, env=env)
    assert message in caught.value.message


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TierConfig, tmp_path / "missing.toml", env={})


def test_unrelated_environment_is_ignored() -> None:
    config = load_config(TierConfig, env={"EDGECASCADE_BATCHING__MAX_BATCH_SIZE": "1", "PATH": "/bin"})
    assert config.server.port == 0


@pytest.mark.parametrize(("cores", "intra_op_threads", "runs"), [(1, 1, 1), (2, 1, 1), (8, 1, 7), (8, 2, 3)])
def test_by_default_onnxruntime_leaves_the_event_loop_a_core(
    monkeypatch: pytest.MonkeyPatch, cores: int, intra_op_threads: int, runs: int
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert RuntimeSection(intra_op_threads=intra_op_threads).concurrent_runs == runs
    assert RuntimeSection(max_concurrent_runs=1).concurrent_runs == 1  # what is configured is what runs
