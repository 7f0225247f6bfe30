"""``edgecascade infer``, ``generate`` and ``status``: talk to a running mesh."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgecascade.model_commands import registry_expiry
from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.engine.generation import TEXT_INPUT, TEXT_OUTPUT
from services.engine.memory import megabytes
from services.errors import ConfigError
from services.inference import (
    CASCADE,
    CASCADE_CONFIDENCE,
    CASCADE_SPECULATIVE,
    CONFIDENCE,
    DEGRADED,
    DRAFTS,
    DRAFTS_ACCEPTED,
    FALLBACK_REASON,
    FINAL_RESPONSE,
    FINISH_REASON,
    ROUTE,
    SERVED_BY,
    THRESHOLD,
    TOKEN_LOCAL,
    TOKEN_ORIGIN,
    TOKEN_PROBABILITY,
    TOKEN_UPSTREAM,
    TOKENS,
    TOKENS_ESCALATED,
    TOKENS_LOCAL,
    UPSTREAM_CALLS,
)
from services.rpc.converters import params_from_proto, set_param
from services.tensors import encode_raw


def read_endpoints(state_dir: Path) -> dict[str, Any]:
    """Reads ``<state-dir>/endpoints.json``.

    Raises:
        ConfigError: The file is missing (the mesh is not up) or malformed.
    """
    path = state_dir / "endpoints.json"
    try:
        endpoints: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: start the mesh with `edgecascade up` first, or pass --address") from None
    except ValueError:
        raise ConfigError(f"{path} is not valid JSON") from None
    return endpoints


def node_states(state_dir: Path) -> dict[str, dict[str, Any]]:
    """What ``edgecascade up`` records about each node in ``<state-dir>/nodes.json``, by address.

    Empty if the file is missing or unreadable (the launcher writes it atomically, so only a foreign file is),
    or if the launcher that wrote it is gone (killed, so it could not remove the file).
    """
    try:
        record = json.loads((state_dir / "nodes.json").read_text())
        launcher = int(record["launcher_pid"])
        nodes = {str(node["address"]): node for node in record["nodes"] if node.get("address")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    try:
        os.kill(launcher, 0)
    except ProcessLookupError:
        return {}  # the launcher is gone
    except PermissionError:
        pass  # alive, run by another user (e.g. root)
    return nodes


def device_address(state_dir: Path, address: str | None) -> str:
    """The address to send to: ``address`` if given, else the first device of the running mesh."""
    if address:
        return address
    devices = read_endpoints(state_dir).get("devices") or []
    if not devices:
        raise ConfigError("endpoints.json lists no devices")
    return str(devices[0])


def _text_request(model: str, prompt: str, parameters: dict[str, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=TEXT_INPUT, datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_raw(np.array([prompt.encode("utf-8")], dtype=object)))
    for key, value in parameters.items():
        set_param(request.parameters[key], value)
    return request


def _describe(params: dict[str, Any]) -> str:
    text = f"served by [bold]{params.get(SERVED_BY, '?')}[/bold]"
    if FALLBACK_REASON in params:
        text += f" (forwarded: {params[FALLBACK_REASON]}; route {params.get(ROUTE, '?')})"
    return text


def infer(console: Console, address: str, model: str, prompt: str, top: int, timeout: float) -> int:
    """Asks for the next-character distribution after ``prompt`` and prints the top candidates."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            config = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=timeout).config
            response = stub.ModelInfer(_text_request(model, prompt, {}), timeout=timeout)
        except grpc.RpcError as exc:
            console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            return 1
    probs = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    vocab: list[str] = json.loads(config.parameters["edgecascade.vocab"].string_value or "[]")
    table = Table(title=f"next character after {prompt!r} ({model} v{response.model_version})")
    table.add_column("rank")
    table.add_column("next")
    table.add_column("probability", justify="right")
    for rank, index in enumerate(np.argsort(probs)[::-1][:top], start=1):
        label = repr(vocab[index]) if index < len(vocab) else f"id {int(index)}"
        table.add_row(str(rank), label, f"{probs[index]:.3f}")
    console.print(table)
    console.print(_describe(params_from_proto(response.parameters)))
    return 0


def _stream(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, timeout: float
) -> Iterator[pb.ModelStreamInferResponse]:
    return stub.ModelStreamInfer(iter([request]), timeout=timeout)  # type: ignore[no-any-return]


# How ``generate`` shows a token's origin: its colour, or (on a console without colour) brackets around it.
ORIGIN_STYLES = {TOKEN_LOCAL: "green", TOKEN_UPSTREAM: "magenta"}
ORIGIN_MARKERS = {TOKEN_LOCAL: ("", ""), TOKEN_UPSTREAM: ("⟦", "⟧")}


def generate(
    console: Console, address: str, model: str, prompt: str, parameters: dict[str, Any], timeout: float
) -> int:
    """Streams a generation and prints tokens as they arrive.

    With a cascade (the model is paired with an upstream model, or ``edgecascade.cascade``
    asks for one), each token is shown by origin — green: this device's model, magenta:
    the upstream's (in brackets ⟦…⟧ when the console has no colour) — and the tallies
    follow the text.
    """
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        console.print(f"[dim]{escape(prompt)}[/dim]", end="")
        final: dict[str, Any] = {}
        probabilities: list[float] = []
        try:
            for message in _stream(stub, _text_request(model, prompt, parameters), timeout):
                if message.error_message:
                    console.print(f"\n[red]error[/red]: {escape(message.error_message)}")
                    return 1
                response = message.infer_response
                params = params_from_proto(response.parameters)
                if params.get(FINAL_RESPONSE):
                    final = params
                    break
                names = [o.name for o in response.outputs]
                raw = response.raw_output_contents[names.index(TEXT_OUTPUT)]
                _print_token(console, raw[4:].decode("utf-8", errors="replace"), params.get(TOKEN_ORIGIN))
                probabilities.append(float(params.get(TOKEN_PROBABILITY, 0.0)))
        except grpc.RpcError as exc:
            console.print(f"\n[red]{exc.code().name}[/red]: {escape(exc.details() or '')}")
            return 1
    console.print()
    # A confidence cascade reports the device's mean confidence; otherwise it is the mean token probability.
    mean = "mean confidence" if final.get(CASCADE) == CASCADE_CONFIDENCE else "mean token probability"
    console.print(
        f"{_describe(final)} · {final.get(TOKENS, len(probabilities))} tokens · "
        f"{mean} {final.get(CONFIDENCE, 0.0):.2f} · finish: {final.get(FINISH_REASON, '?')}"
    )
    if TOKENS_LOCAL in final:
        console.print(cascade_tallies(final))
    return 0


def _print_token(console: Console, text: str, origin: Any) -> None:
    """Prints one generated token in the colour (or within the markers) of its origin."""
    if not isinstance(origin, str) or origin not in ORIGIN_STYLES:
        console.print(text, end="", markup=False, highlight=False)
    elif console.color_system is None:
        before, after = ORIGIN_MARKERS[origin]
        console.print(f"{before}{text}{after}", end="", markup=False, highlight=False)
    else:
        console.print(text, end="", markup=False, highlight=False, style=ORIGIN_STYLES[origin])


def cascade_tallies(final: dict[str, Any]) -> str:
    """One line of a cascaded generation's tallies, from its final response's parameters."""
    local = int(final.get(TOKENS_LOCAL, 0))
    escalated = int(final.get(TOKENS_ESCALATED, 0))
    total = local + escalated
    share = f" ({local / total:.0%} local)" if total else ""
    mode = final.get(CASCADE, "?")
    threshold = final.get(THRESHOLD)
    text = f"cascade [bold]{escape(str(mode))}[/bold]"
    if mode != CASCADE_SPECULATIVE and isinstance(threshold, int | float):
        text += f" (threshold {threshold:.2f})"
    text += (
        f" · [green]{local} local[/green] · [magenta]{escalated} escalated[/magenta]{share}"
        f" · {final.get(UPSTREAM_CALLS, 0)} upstream calls"
    )
    drafts = final.get(DRAFTS)
    if isinstance(drafts, int) and drafts:
        accepted = int(final.get(DRAFTS_ACCEPTED, 0))
        text += f" · drafts accepted {accepted}/{drafts} ({accepted / drafts:.0%})"
    if final.get(DEGRADED):
        text += f" · [yellow]degraded: {escape(str(final[DEGRADED]))} (the rest generated locally)[/yellow]"
    return text


def _artifacts(info: mesh_pb2.GetTierInfoResponse) -> str:
    """The artifact cache's use and counters (an edge's), or ``-``."""
    if not info.HasField("artifact_cache"):
        return "-"
    a = info.artifact_cache
    bound = megabytes(a.max_bytes) if a.max_bytes else "unbounded"
    return (
        f"{megabytes(a.used_bytes)} / {bound} · blobs {a.blobs} · hits {a.hits} · misses {a.misses} · "
        f"evicted {a.evictions} ({megabytes(a.evicted_bytes)})"
    )


_BREAKER_COLOURS = {"closed": "green", "half_open": "yellow", "open": "red"}


def _upstream(info: mesh_pb2.GetTierInfoResponse) -> str:
    """The upstream's address and how calls to it fare: breaker state, retries, result cache (or ``-``)."""
    if not info.upstream:
        return "-"
    if not info.HasField("upstream_status"):
        return escape(info.upstream)
    u = info.upstream_status
    colour = _BREAKER_COLOURS.get(u.breaker_state, "yellow")
    line = f"{escape(info.upstream)} · breaker [{colour}]{escape(u.breaker_state.replace('_', '-'))}[/{colour}]"
    if u.breaker_state == "open":
        line += f" (probe in {u.breaker_retry_in_s:.1f} s)"
    if u.breaker_opened:
        line += f" · opened {u.breaker_opened}× · refused {u.breaker_rejected}"
    if u.last_failure and u.breaker_state != "closed":
        line += f" [red]({escape(u.last_failure)})[/red]"
    if u.retries or u.retries_refused:
        line += f" · retries {u.retries} ({u.retries_refused} refused)"
    lookups = u.cache_hits + u.cache_misses
    if lookups:
        line += f" · cache hits {100 * u.cache_hits / lookups:.0f} % of {lookups}"
    return line


def _updates(info: mesh_pb2.GetTierInfoResponse) -> str:
    """The node's enrollment and each model's update state against its desired version, or ``-``."""
    if not info.HasField("updates"):
        return "-"
    u = info.updates
    if not u.enrolled:
        why = f": {escape(u.last_error)}" if u.last_error else ""
        return f"[yellow]not enrolled[/yellow] ({u.failed_check_ins} failed attempts{why})"
    desired = {d.name: d for d in u.desired}
    parts = []
    for m in u.installed:
        if m.shadow:  # a rollout's shadow stage: installed beside the serving version, never serving
            line = f"shadow {escape(m.name)} {escape(m.version)} {escape(m.variant)} {escape(m.state)}"
            parts.append(line + (f" [red]({escape(m.last_error)})[/red]" if m.last_error else ""))
            continue
        want = desired.pop(m.name, None)
        line = f"{escape(m.name)} {escape(m.version)} {escape(m.variant)} {escape(m.state)}"
        if want is not None and (want.version, want.variant) != (m.version, m.variant):
            line += f" → {escape(want.version)} {escape(want.variant)}"
        if m.last_error:
            line += f" [red]({escape(m.last_error)})[/red]"
        parts.append(line)
    parts += [f"{escape(d.name)} → {escape(d.version)} {escape(d.variant)} (waiting)" for d in desired.values()]
    seen = "never" if u.last_check_in_age_s < 0 else f"{u.last_check_in_age_s:.0f} s ago"
    return "; ".join(parts or ["nothing assigned"]) + f" · checked in {seen}"


_THERMAL_COLOURS = {"normal": "green", "hot": "yellow", "critical": "red"}


def _thermal(info: mesh_pb2.GetTierInfoResponse) -> str:
    """A device's thermal state, temperature, power and its source, and inferences per joule; ``-`` for others."""
    if not info.HasField("thermal"):
        return "-"
    t = info.thermal
    if not t.enabled:
        return "off"
    colour = _THERMAL_COLOURS.get(t.state, "yellow")
    line = f"[{colour}]{escape(t.state)}[/{colour}]"
    if t.shrink_steps or t.forwarding:
        caps = [f"slots {t.run_slots}/{t.configured_run_slots}"]
        if t.batch_caps:
            caps.append(f"batch ≤ {max(c.rows for c in t.batch_caps)}")
        if t.forwarding:
            caps.append("new work upstream")
        line += f" ({', '.join(caps)})"
    if t.HasField("temperature_c"):
        line += f" · {t.temperature_c:.1f} °C"
    elif any(key.startswith("temperature.") for key in t.faults_by_sensor):
        line += " · [yellow]no valid temperature[/yellow]"  # a sensor exists, but what it gives is ignored
    else:
        line += " · no sensor"
    if t.HasField("power_watts"):
        line += f" · {t.power_watts:.1f} W {escape(t.power_source)}"
    joules = sum(v.joules for v in t.energy)
    if joules > 0:
        inferences = sum(v.inferences for v in t.energy)
        source = "estimated" if any(v.source == "estimated" for v in t.energy) else "measured"
        line += f" · {inferences / joules:.3g} inferences/J {source}"
    faults = sum(t.faults.values())
    if faults:
        line += f" · {faults} bad readings ignored"
    return line


def status(console: Console, state_dir: Path, timeout: float) -> int:
    """Prints what every node of the running mesh reports about itself, and the registry's expiry warnings.

    A node that does not answer and that ``edgecascade up`` is restarting or gave
    up on is shown with that state (from ``nodes.json``) instead of the RPC error.
    Each node's upstream column shows the circuit breaker to its upstream
    (closed, open or half-open, how often it opened), its retries and result-cache hits.
    A device's thermal column shows its thermal state (normal, hot or critical, with the
    limits in force), its temperature (or "no sensor"), its power and whether that was
    measured (RAPL) or estimated (its power profile), and its inferences per joule.
    Then a warning for each role of the region's registry metadata that expires
    soon: root or targets within 30 days, snapshot or timestamp within an hour
    (the region re-signs those hours ahead, so that means its re-signer is not
    running).

    Returns:
        1 when a node does not answer or a registry role has expired, else 0.
    """
    endpoints = read_endpoints(state_dir)
    states = node_states(state_dir)
    addresses = [endpoints["region"], endpoints["edge"], *endpoints["devices"]]
    table = Table(title="edgecascade mesh")
    columns = (
        "address",
        "tier",
        "node",
        "upstream",
        "memory used / budget",
        "models",
        "updates",
        "artifact cache",
        "thermal",
    )
    for column in columns:
        table.add_column(column)
    failures = 0
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            try:
                info = mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(
                    mesh_pb2.GetTierInfoRequest(), timeout=timeout
                )
            except grpc.RpcError as exc:
                node = states.get(address, {})
                if node.get("state", "up") != "up":  # the launcher knows why: show that, not just the RPC error
                    colour = "red" if node["state"] == "down" else "yellow"
                    what = f"[{colour}]{escape(str(node['state']))}[/{colour}]: {escape(str(node.get('detail', '')))}"
                    table.add_row(address, "?", escape(str(node.get("name", "?"))), "?", "?", what)
                else:
                    table.add_row(address, "?", "?", "?", "?", f"[red]{exc.code().name}[/red]")
                failures += 1
                continue
        models = ", ".join(f"{m.name} v{m.version} {m.state}" for m in info.models) or "-"
        memory = f"{megabytes(info.cache.used_bytes)} / {megabytes(info.cache.budget_bytes)}"
        upstream = _upstream(info)
        table.add_row(
            address,
            info.tier_name,
            info.node_id,
            upstream,
            memory,
            models,
            _updates(info),
            _artifacts(info),
            _thermal(info),
        )
    console.print(table)
    # Registry metadata close to expiry (read from the region's artifact service): warned well ahead,
    # and a failure once a role has expired (every client refresh in the fleet fails on it).
    expiry = registry_expiry(endpoints["region"], timeout)
    for warning in expiry.warnings:
        console.print(f"warning: {warning}", style="red" if "EXPIRED" in warning else "yellow", markup=False)
    return 1 if failures or expiry.expired else 0
