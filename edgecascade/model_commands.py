"""``edgecascade model …``: the publish pipeline on the command line.

Commands::

    edgecascade model init      create a registry (dev keys + an empty TUF repository)
    edgecascade model quantize  FILE.onnx → FILE.int8.onnx (onnxruntime dynamic quantization)
    edgecascade model profile   measure variants in fresh processes against the fp32 reference
    edgecascade model publish   gate, encrypt, sign and publish variants of a model version
    edgecascade model list      the registry's variants with their profiles
    edgecascade model show      one model's signed metadata
    edgecascade model resign-targets  renew the targets metadata (same targets, new expiry)
    edgecascade model rotate-root     root version N+1: new root keys, or --keep-keys to renew its expiry

The registry and key directories default to the ones ``edgecascade up`` uses
(``.edgecascade/region-1/registry`` and ``…/keys``); ``--config FILE.toml``
(or ``EDGECASCADE_REGISTRY__*``) supplies metadata lifetimes and paths.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.config import load_config
from services.engine.memory import megabytes
from services.errors import (
    EdgecascadeError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)
from services.rpc.artifact_client import GrpcArtifactSource
from services.updates.variant_facts import VariantFacts, signature_from_json
from tier2_region.config import RegionConfig
from tier2_region.registry.metadata_expiry import expired_roles, expiry_warnings, read_expiries
from tier2_region.registry.model_inspection import inspect_model
from tier2_region.registry.pipeline import (
    DEFAULT_VALIDATION_ROWS,
    PipelineOptions,
    ValidationChoice,
    prepare,
    publish_model,
)
from tier2_region.registry.profiler import ProfileSettings
from tier2_region.registry.profiles import VariantProfile, dump_profiles, load_profiles
from tier2_region.registry.quantization import default_output, quantize
from tier2_region.registry.quantization_gate import DEFAULT_MAX_DROP_POINTS, GateOverride
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.registry_database import VariantRecord
from tier2_region.registry.signing_keys import generate_keys, load_keys, root_key_files
from tier2_region.registry.tuf_repository import utc_now
from tier2_region.registry.validation_sets import char_lm_tokenizer

DEFAULT_REGISTRY = Path(".edgecascade/region-1/registry")
DEFAULT_KEYS = Path(".edgecascade/region-1/keys")
# The demo's own corpus, in a checkout of edgecascade (absent from an installed package).
DEMO_CORPUS_FILE = Path(__file__).resolve().parents[1] / "examples" / "charlm" / "corpus.py"

Command = Callable[[argparse.Namespace, Console], int]


def _refusing(command: Command) -> Command:
    """The handler of a ``model`` verb: a refused request prints its reason and exits with 2."""

    @functools.wraps(command)
    def handler(args: argparse.Namespace, console: Console) -> int:
        try:
            return command(args, console)
        except EdgecascadeError as exc:
            console.print(f"[red]refused:[/red] {exc.message}")
            return 2

    return handler


def registry_args(p: argparse.ArgumentParser, keys: bool, keys_help: str = "") -> None:
    """Adds ``--registry`` (and ``--keys``, with ``keys_help`` if given) and ``--config`` to a ``model`` verb."""
    p.add_argument("--registry", type=Path, help=f"registry directory (default {DEFAULT_REGISTRY})")
    if keys:
        p.add_argument(
            "--keys",
            type=Path,
            help=keys_help or f"directory with targets.pem and online.pem (default {DEFAULT_KEYS})",
        )
    p.add_argument("--config", type=Path, help="TOML file whose [registry] section sets paths and expiries")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``model`` and its subcommands to the ``edgecascade`` parser."""
    model = subparsers.add_parser(
        "model",
        help="quantize, profile and publish models into the region's TUF registry",
        description="The publish pipeline: quantize → profile → gate → encrypt → sign → publish; "
        "resign-targets and rotate-root keep the registry's signed metadata from expiring.",
    )
    sub = model.add_subparsers(dest="model_command", required=True)

    def profile_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--batch-sizes", default="1,8,64", help="batch sizes to measure (default 1,8,64)")
        p.add_argument("--validation", type=Path, help=".npz validation set: one array per input, optional 'labels'")
        p.add_argument("--text", type=Path, help="held-out text for a char-LM (documents separated by blank lines)")
        p.add_argument("--rows", type=int, default=DEFAULT_VALIDATION_ROWS, help="validation rows (default 4000)")
        p.add_argument("--target-accuracy", type=float, default=0.8, help="accuracy of kept predictions (default 0.8)")
        p.add_argument("--latency-runs", type=int, default=50, help="timed runs per batch size (default 50)")

    init = sub.add_parser("init", help="create a registry: dev signing keys and an empty TUF repository")
    registry_args(init, keys=True)
    init.add_argument(
        "--root-keys-dir", type=Path, help="where root keys go (default: --keys; keep offline in production)"
    )
    init.add_argument("--root-key-count", type=int, default=1, help="number of root keys (default 1)")
    init.add_argument("--root-threshold", type=int, default=1, help="root signatures clients require (default 1)")
    init.set_defaults(handler=_refusing(_init))

    q = sub.add_parser("quantize", help="write an int8 variant with onnxruntime dynamic quantization")
    q.add_argument("model", type=Path, help="the fp32 .onnx file")
    q.add_argument("--out", type=Path, help="output file (default: MODEL.int8.onnx next to it)")
    q.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    q.add_argument("--weight-type", default="qint8", choices=["qint8", "quint8"])
    q.set_defaults(handler=_refusing(_quantize))

    prof = sub.add_parser("profile", help="profile variants, each in a fresh process, against the first (fp32) file")
    prof.add_argument("models", type=Path, nargs="+", help="the reference (fp32) file first, then its variants")
    prof.add_argument("--out", type=Path, default=Path("profiles.json"), help="profiles file (default profiles.json)")
    profile_args(prof)
    prof.set_defaults(handler=_refusing(_profile))

    pub = sub.add_parser("publish", help="gate, encrypt, sign and publish the variants of one model version")
    pub.add_argument("variants", nargs="+", metavar="VARIANT=FILE", help="e.g. fp32=model.onnx int8=model.int8.onnx")
    pub.add_argument("--name", required=True, help="model name")
    pub.add_argument("--version", required=True, help="model version (a positive integer)")
    pub.add_argument("--reference", default="fp32", help="variant the others are gated against (default fp32)")
    pub.add_argument("--reference-file", type=Path, help="a reference model compared against but not published")
    pub.add_argument(
        "--profiles", type=Path, help="profiles written by `edgecascade model profile` (else: profile now)"
    )
    pub.add_argument(
        "--max-drop-points",
        type=float,
        default=DEFAULT_MAX_DROP_POINTS,
        help="largest accuracy drop against the reference, in points (default 1)",
    )
    pub.add_argument(
        "--override-gate", metavar="REASON", help="publish variants that fail the gate; REASON is signed in"
    )
    pub.add_argument(
        "--signature", type=Path, help="JSON {inputs:[{name,datatype,shape}], outputs:[…]} to check against"
    )
    pub.add_argument("--hardware-class", action="append", default=[], help="device class (repeatable)")
    pub.add_argument("--min-onnxruntime", default="", help="oldest onnxruntime that may load it (default: profiler's)")
    registry_args(pub, keys=True)
    profile_args(pub)
    pub.set_defaults(handler=_refusing(_publish))

    _add_views(sub)
    _add_metadata_verbs(sub)


def _add_views(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``list`` and ``show``: what the registry holds."""
    lst = sub.add_parser("list", help="the registry's variants and their profiles")
    registry_args(lst, keys=False)
    lst.set_defaults(handler=_refusing(_list))

    show = sub.add_parser("show", help="one model's signed metadata")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default="")
    show.add_argument("--json", action="store_true", help="print the signed custom fields as JSON")
    registry_args(show, keys=False)
    show.set_defaults(handler=_refusing(_show))


def _add_metadata_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``resign-targets`` and ``rotate-root``: keep the registry's metadata from expiring."""
    resign = sub.add_parser(
        "resign-targets",
        help="renew the targets metadata: same targets, a new version and expiry (needs targets.pem)",
        description="Re-sign the registry's targets metadata with the targets key (the same targets, the next "
        "version, a new expiry), then snapshot and timestamp. Targets expire [registry] targets_expiry_s after "
        "their last signature (90 days by default); once expired, every client refresh in the fleet fails. "
        "`edgecascade status` warns 30 days ahead.",
    )
    registry_args(resign, keys=True)
    resign.set_defaults(handler=_refusing(resign_targets))

    rotate = sub.add_parser(
        "rotate-root",
        help="write root version N+1 with new root keys (or --keep-keys to renew root's expiry)",
        description="Write root metadata version N+1, signed by a threshold of the current root keys and of the "
        "new ones, so that clients holding any earlier root follow the chain. New keys are written as "
        "root-<k>.pem (mode 600) in --new-root-keys-dir and made durable before root N+1 is committed; the "
        "replaced ones then move to retired-root-v<N>/ next to them. With --keep-keys root's keys and threshold "
        "stay exactly as they are (a threshold of them must be at hand) and only its version and expiry change. "
        "A rotation interrupted by a crash is settled by the next one. Root expires [registry] root_expiry_s "
        "after it is signed (a year by default).",
    )
    registry_args(
        rotate,
        keys=True,
        keys_help=f"default for --root-keys-dir: the directory with the current root keys (default {DEFAULT_KEYS}); "
        "rotate-root uses no other key",
    )
    rotate.add_argument("--root-keys-dir", type=Path, help="directory with the current root keys (default: --keys)")
    rotate.add_argument("--new-root-keys-dir", type=Path, help="where the new root keys go (default: --root-keys-dir)")
    rotate.add_argument("--root-key-count", type=int, default=0, help="number of new root keys (default: as now)")
    rotate.add_argument(
        "--root-threshold", type=int, default=0, help="root signatures clients require from now on (default: as now)"
    )
    rotate.add_argument(
        "--keep-keys",
        action="store_true",
        help="keep root's keys and threshold as they are; only renew its expiry",
    )
    rotate.set_defaults(handler=_refusing(rotate_root))


def _paths(args: argparse.Namespace) -> tuple[RegionConfig, Path, Path]:
    config = load_config(RegionConfig, getattr(args, "config", None))
    registry = args.registry or (Path(config.registry.path) if config.registry.path else DEFAULT_REGISTRY)
    keys = getattr(args, "keys", None) or (Path(config.registry.key_dir) if config.registry.key_dir else DEFAULT_KEYS)
    return config, registry, keys


def _init(args: argparse.Namespace, console: Console) -> int:
    config, registry_dir, key_dir = _paths(args)
    root_dir = args.root_keys_dir or key_dir
    if not (key_dir / "online.pem").exists():
        for path in generate_keys(key_dir, root_dir, args.root_key_count):
            console.print(f"generated {path} (mode 600)")
    registry = ModelRegistry(registry_dir, config.registry.expiry)
    try:
        registry.create(load_keys(key_dir, root_dir), args.root_threshold, key_dir, root_dir)
    finally:
        registry.close()
    console.print(
        f"created the TUF registry in {registry_dir} (root threshold {args.root_threshold} of "
        f"{len(root_key_files(root_dir))}); clients embed its newest root, now "
        f"{registry_dir / 'repository/metadata/1.root.json'}"
    )
    return 0


def _quantize(args: argparse.Namespace, console: Console) -> int:
    out = args.out or default_output(args.model)
    with _spinner(console, f"quantizing {args.model.name}"):
        quantize(args.model, out, per_channel=args.per_channel, weight_type=args.weight_type)
    before, after = args.model.stat().st_size, out.stat().st_size
    console.print(f"wrote {out}: {megabytes(before)} → {megabytes(after)} ({after / before:.2f}× the size)")
    return 0


def profile_settings(args: argparse.Namespace) -> ProfileSettings:
    """Profiling settings from the command-line options.

    Raises:
        InvalidArgumentError: The batch sizes are not a comma-separated list of integers.
    """
    try:
        sizes = tuple(int(b) for b in str(args.batch_sizes).split(",") if b.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}"
        ) from None
    return ProfileSettings(batch_sizes=sizes, latency_runs=args.latency_runs, target_accuracy=args.target_accuracy)


def heldout_docs(reference: Path, text: Path | None) -> tuple[list[str] | None, str]:
    """Held-out text for a char-LM reference: ``--text``, else the demo corpus's held-out split if available.

    The demo corpus (``examples/charlm/corpus.py``) is only in a checkout: it is
    imported when importable, else loaded from the checkout next to this
    package. Returns ``(None, "")`` when the model is not a char-LM or there is
    no such text (the pipeline then uses stdlib docstrings of its own choosing).
    """
    if text is not None:
        docs = [d.strip() for d in text.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        return docs, f"text of {text.name}"
    if char_lm_tokenizer(inspect_model(reference).properties) is None:
        return None, ""
    corpus = _demo_corpus()
    if corpus is None:
        return None, ""
    try:
        docs = [str(d) for d in corpus.build_corpus().heldout_docs]
    except (AttributeError, OSError, ValueError):
        return None, ""
    return docs, "the demo corpus's held-out stdlib docstrings"


def _demo_corpus() -> ModuleType | None:
    try:
        return importlib.import_module("examples.charlm.corpus")
    except ImportError:
        pass
    path = DEMO_CORPUS_FILE
    spec = importlib.util.spec_from_file_location("edgecascade_demo_corpus", path) if path.is_file() else None
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # a half-finished corpus module must not stop publishing; stdlib text is the fallback
        del sys.modules[spec.name]
        return None
    return module


def _options(args: argparse.Namespace, reference: Path) -> PipelineOptions:
    docs, source = (None, "")
    if args.validation is None:
        docs, source = heldout_docs(reference, args.text)
    override = None
    if getattr(args, "override_gate", None):
        override = GateOverride(
            args.override_gate, getpass.getuser(), datetime.now(UTC).replace(microsecond=0).isoformat()
        )
    declared = None
    if getattr(args, "signature", None):
        try:
            declared = signature_from_json(json.loads(args.signature.read_text()), str(args.signature))
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"--signature {args.signature} is not a readable JSON file: {exc}") from None
    return PipelineOptions(
        profile=profile_settings(args),
        validation=ValidationChoice(args.validation, docs, source, args.rows),
        max_drop_points=getattr(args, "max_drop_points", DEFAULT_MAX_DROP_POINTS),
        override=override,
        hardware_classes=tuple(getattr(args, "hardware_class", ()) or ()),
        min_onnxruntime_version=getattr(args, "min_onnxruntime", ""),
        declared_signature=declared,
    )


def _profile(args: argparse.Namespace, console: Console) -> int:
    files = {f"v{i}" if i else "reference": path for i, path in enumerate(args.models)}
    options = _options(args, args.models[0])
    with _progress(console) as say:
        subs = prepare(files, "reference", options, on_progress=say)
    profiles = {s.facts.sha256: s.profile for s in subs}
    args.out.write_text(dump_profiles(profiles))
    console.print(profile_table([(s.facts.path.name, s.profile) for s in subs]))
    console.print(f"profiles written to {args.out}")
    return 0


def _publish(args: argparse.Namespace, console: Console) -> int:
    config, registry_dir, key_dir = _paths(args)
    files: dict[str, Path] = {}
    for item in args.variants:
        variant, sep, file = item.partition("=")
        if not sep or not variant or not file:
            raise InvalidArgumentError(f"variants are given as VARIANT=FILE (e.g. int8=model.int8.onnx), got {item!r}")
        files[variant] = Path(file)
    reference_path = args.reference_file or files.get(args.reference) or next(iter(files.values()))
    options = _options(args, reference_path)
    profiles: dict[str, VariantProfile] | None = None
    if args.profiles is not None:
        profiles = load_profiles(args.profiles.read_text(), str(args.profiles))
    keys = load_keys(key_dir)
    registry = ModelRegistry(registry_dir, config.registry.expiry)
    try:
        with _progress(console) as say:
            subs = prepare(files, args.reference, options, args.reference_file, profiles, say)
        console.print(profile_table([(f"{s.variant} ({s.facts.path.name})", s.profile) for s in subs]))
        published = publish_model(registry, keys, args.name, args.version, subs, options)
        version = registry.repository.state().targets.signed.version
    finally:
        registry.close()
    for item in published:
        gate = item.gate
        note = (
            ""
            if gate is None or gate.passed
            else f" [yellow](gate overridden: {gate.override.reason if gate.override else ''})[/yellow]"
        )
        console.print(f"published {item.target_path}: {item.length} bytes encrypted, sha256 {item.sha256[:16]}…{note}")
    console.print(f"registry at targets version {version}")
    return 0


def profile_table(rows: Sequence[tuple[str, VariantProfile]]) -> Table:
    """A table of profiles: size, peak memory and latency at batch 1 and the max batch, accuracy, threshold."""
    table = Table(title="profiles (each variant measured in a fresh process)")
    for column in ("variant", "size", "load", "peak b=1/max", "p50 b=1/max", "accuracy", "Δ pts", "agree", "threshold"):
        table.add_column(column)
    for name, p in rows:
        one, top = p.batch(min(b.batch_size for b in p.batches)), p.batch(p.max_batch_size)
        table.add_row(
            name,
            size(p.file_bytes),
            f"{p.load_time_ms:.0f} ms",
            f"{size(one.peak_memory_bytes)} / {size(top.peak_memory_bytes)} (b={top.batch_size})",
            f"{one.latency_p50_us:.0f} / {top.latency_p50_us:.0f} µs",
            f"{p.accuracy:.2%}",
            f"{p.accuracy_drop_points:+.2f}",
            f"{p.agreement:.1%}",
            f"{p.confidence_threshold:.3f}",
        )
    return table


def size(n: int) -> str:
    """Bytes as kB below a megabyte, else MB."""
    return f"{n / 1024:.0f} kB" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MB"


def _list(args: argparse.Namespace, console: Console) -> int:
    _, registry_dir, _ = _paths(args)
    registry = _open_existing(registry_dir)
    try:
        records = registry.variants()
    finally:
        registry.close()
    console.print(variants_table(records, f"registry {registry_dir}"))
    return 0


def variants_table(records: Sequence[VariantRecord], title: str) -> Table:
    """A table of published variants with their signed profiles."""
    table = Table(title=title)
    for column in (
        "model",
        "ver",
        "variant",
        "encrypted",
        "peak (max b)",
        "p50 b=1",
        "accuracy",
        "Δ pts",
        "thr",
        "gate",
    ):
        table.add_column(column)
    for r in records:
        facts = VariantFacts.from_dict(r.custom, r.target_path)
        peak = facts.peak_memory_bytes(facts.max_batch_size) or 0
        one = facts.latency_us(1)
        gate = facts.gate
        verdict = "pass" if gate.passed else ("override" if gate.override else "fail")
        table.add_row(
            r.name,
            r.version,
            r.variant,
            size(r.blob_length),
            f"{size(peak)} ({facts.max_batch_size})",
            f"{one.p50 if one else '?'} µs",
            f"{float(facts.accuracy.value):.2%}",
            f"{float(facts.accuracy.drop_points):+.2f}",
            f"{facts.threshold:.2f}",
            verdict,
        )
    return table


def _show(args: argparse.Namespace, console: Console) -> int:
    _, registry_dir, _ = _paths(args)
    registry = _open_existing(registry_dir)
    try:
        records = registry.variants(args.name, args.version)
        if not records:
            raise InvalidArgumentError(
                f"model '{args.name}'{' version ' + args.version if args.version else ''} is not in {registry_dir}"
            )
        signed = {r.target_path: registry.target(r.name, r.version, r.variant) for r in records}
    finally:
        registry.close()
    if args.json:
        console.print_json(json.dumps({path: info.custom for path, info in signed.items()}))
        return 0
    for path, info in signed.items():
        console.print(_facts_table(path, info.length, info.hashes["sha256"], VariantFacts.from_dict(info.custom, path)))
    return 0


def _facts_table(path: str, length: int, sha256: str, facts: VariantFacts) -> Table:
    """One variant's signed facts, a row per fact."""
    table = Table(title=f"{path} (signed)", show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("encrypted blob", f"{length} bytes, sha256 {sha256}")
    table.add_row("plaintext", f"{facts.plaintext_length} bytes, sha256 {facts.plaintext_sha256}")
    table.add_row("encryption", f"{facts.encryption.algorithm}, key {facts.encryption.key_id}")
    for side, specs in (("inputs", facts.signature.inputs), ("outputs", facts.signature.outputs)):
        table.add_row(side, ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in specs))
    table.add_row("peak memory", ", ".join(f"b={b}: {size(v)}" for b, v in facts.peak_memory.items()))
    table.add_row("latency p50/p99", ", ".join(f"b={b}: {v.p50}/{v.p99} µs" for b, v in facts.latency.items()))
    table.add_row("load time", f"{facts.load_time_us / 1000:.1f} ms")
    acc = facts.accuracy
    table.add_row(
        "accuracy",
        f"{acc.metric} {float(acc.value):.2%} (reference {float(acc.reference):.2%}, "
        f"{float(acc.drop_points):+.2f} pts, agreement {float(acc.agreement):.2%}, "
        f"{acc.validation_size} rows: {acc.validation_source})",
    )
    table.add_row(
        "confidence threshold",
        f"{facts.confidence_threshold:f} (kept predictions reach {facts.confidence_target_accuracy:f})",
    )
    table.add_row("gate", json.dumps(facts.gate.to_dict(), sort_keys=True))  # as the metadata file orders it
    table.add_row("hardware classes", ", ".join(facts.hardware_classes))
    table.add_row("min onnxruntime / opset", f"{facts.min_onnxruntime_version} / {facts.opset}")
    table.add_row("golden vectors", facts.golden_vectors)
    table.add_row("published", facts.published_at)
    return table


def resign_targets(args: argparse.Namespace, console: Console) -> int:
    """``model resign-targets``: renews the targets metadata with the targets key."""
    config, registry_dir, key_dir = _paths(args)
    keys = load_keys(key_dir)
    registry = _open_existing(registry_dir, config)
    try:
        state = registry.resign_targets(keys)
    finally:
        registry.close()
    targets = state.targets.signed
    console.print(
        f"re-signed targets: version {targets.version} ({len(targets.targets)} targets), "
        f"expires {targets.expires.isoformat()}; snapshot {state.snapshot.signed.version}, "
        f"timestamp {state.timestamp.signed.version}"
    )
    return 0


def rotate_root(args: argparse.Namespace, console: Console) -> int:
    """``model rotate-root``: root version N+1, signed by the old and the new root keys.

    Raises:
        InvalidArgumentError: ``--keep-keys`` with an option that would change root's keys or threshold.
    """
    if args.keep_keys:
        changing = [
            option
            for option, given in (
                ("--root-key-count", args.root_key_count),
                ("--new-root-keys-dir", args.new_root_keys_dir is not None),
                ("--root-threshold", args.root_threshold),
            )
            if given
        ]
        if changing:
            raise InvalidArgumentError(
                f"--keep-keys keeps root's keys and threshold as they are; it cannot go with {', '.join(changing)} "
                "(leave out --keep-keys to rotate to new keys)"
            )
    config, registry_dir, key_dir = _paths(args)
    root_dir = args.root_keys_dir or key_dir
    registry = _open_existing(registry_dir, config)
    try:
        rotation = registry.rotate_root(
            root_dir,
            new_key_dir=args.new_root_keys_dir,
            new_key_count=args.root_key_count,
            threshold=args.root_threshold,
            keep_keys=args.keep_keys,
        )
    finally:
        registry.close()
    for path in rotation.reconciled:
        console.print(f"moved {path}: left by an interrupted rotation, not a key of the committed root")
    for path in rotation.retired:
        console.print(f"retired {path} (no longer a root key; keep it offline or destroy it)")
    console.print(
        f"root version {rotation.version}: threshold {rotation.threshold} of {len(rotation.key_files)} keys "
        f"({', '.join(str(p) for p in rotation.key_files)}), expires {rotation.expires.isoformat()}; clients "
        "that embed an earlier root follow the chain on their next refresh"
    )
    return 0


@dataclass(frozen=True)
class RegistryExpiry:
    """What ``edgecascade status`` says about the region's registry metadata.

    Attributes:
        warnings: One line per role that expires soon or has expired (or why it could not be read).
        expired: The roles already expired: every client refresh fails on them.
    """

    warnings: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


def registry_expiry(address: str, timeout: float) -> RegistryExpiry:
    """Expiry warnings about the registry metadata a region serves (none when it serves none or cannot be asked).

    Reads the metadata from the region's artifact service, the files every
    client fetches; see :mod:`tier2_region.registry.metadata_expiry`.
    """
    source = GrpcArtifactSource(address, timeout_s=timeout)
    try:
        expiries = read_expiries(source)
    except (NotFoundError, UnimplementedError, UnavailableError):
        return RegistryExpiry()  # no registry behind this region, or the region is down (the table shows that)
    except EdgecascadeError as exc:
        return RegistryExpiry([f"registry metadata expiry could not be read from {address}: {exc.message}"])
    finally:
        source.close()
    now = utc_now()
    return RegistryExpiry(expiry_warnings(expiries, now), expired_roles(expiries, now))


def _open_existing(registry_dir: Path, config: RegionConfig | None = None) -> ModelRegistry:
    if not (registry_dir / "repository" / "metadata" / "timestamp.json").is_file():
        raise InvalidArgumentError(
            f"no registry in {registry_dir}; create one with `edgecascade model init` or start `edgecascade up`"
        )
    return ModelRegistry(registry_dir, config.registry.expiry if config is not None else None)


@contextmanager
def _spinner(console: Console, text: str) -> Iterator[None]:
    with console.status(text):
        yield


@contextmanager
def _progress(console: Console) -> Iterator[Callable[[str], None]]:
    """Yields a callback that shows one spinner line per variant being profiled."""
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as progress:
        current: list[TaskID] = []

        def say(name: str) -> None:
            if current:
                progress.update(current[-1], completed=1, total=1)
            current.append(progress.add_task(f"profiling {name} in a fresh process", total=None))

        yield say
        if current:
            progress.update(current[-1], completed=1, total=1)
