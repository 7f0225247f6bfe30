"""``python -m bench.quantize``: fp32 against int8 for the demo models, measured the way the registry profiles them.

For each demo model found in ``examples/models`` (``charlm-device``,
``charlm-edge``: the fp32 file and its ``.int8`` variant) — or for any fp32
file given with ``--model`` (its int8 variant is made here with the registry's
own quantizer) — one run measures, each variant in a fresh process:

* file size;
* latency p50 at batch 1 and at batch 64 (one onnxruntime thread, as on a device);
* peak resident memory at batch 1 and 64 (VmHWM over the post-import baseline);
* next-character accuracy on the held-out text (the demo corpus's held-out
  split when available) and agreement with fp32.

It prints int8 ÷ fp32 as ratios next to the issue's targets (size ≤ 0.28,
speed ≥ 1.8×, accuracy loss ≤ 0.5 point). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgecascade.model_commands import heldout_docs
from tier2_region.registry.pipeline import PipelineOptions, ValidationChoice, prepare
from tier2_region.registry.profiler import ProfileSettings
from tier2_region.registry.profiles import VariantProfile
from tier2_region.registry.quantization import default_output, quantize

MODELS_DIR = Path(__file__).resolve().parents[1] / "examples" / "models"
DEMO = ("charlm-device", "charlm-edge")


def measure(fp32: Path, int8: Path, rows: int) -> tuple[VariantProfile, VariantProfile]:
    """Profiles both variants (fresh process each) on the same validation rows."""
    docs, source = heldout_docs(fp32, None)
    options = PipelineOptions(
        profile=ProfileSettings(batch_sizes=(1, 64), latency_runs=300, latency_budget_s=3.0),
        validation=ValidationChoice(None, docs, source, rows),
    )
    ref, var = prepare({"fp32": fp32, "int8": int8}, "fp32", options)
    return ref.profile, var.profile


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, action="append", default=[], help="an fp32 .onnx file (repeatable)")
    parser.add_argument("--rows", type=int, default=20_000, help="validation rows (default 20000)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    pairs: list[tuple[str, Path, Path]] = []
    with tempfile.TemporaryDirectory(prefix="edgecascade-bench-") as tmp:
        for name in DEMO:
            fp32, int8 = MODELS_DIR / f"{name}.onnx", MODELS_DIR / f"{name}.int8.onnx"
            if fp32.is_file() and int8.is_file():
                pairs.append((name, fp32, int8))
            else:
                console.print(f"[yellow]{name}: not in {MODELS_DIR}; skipped[/yellow]")
        for model in args.model:
            pairs.append((model.stem, model, quantize(model, Path(tmp) / default_output(model).name)))
        if not pairs:
            console.print("nothing to measure: no demo models and no --model")
            return 1
        table = Table(title=f"int8 ÷ fp32 on {platform.machine()} ({platform.processor() or 'cpu'}), one thread")
        for column in (
            "model", "size fp32→int8", "size ratio (≤0.28)", "speed-up b=1", "speed-up b=64 (≥1.8×)",
            "peak mem b=64", "accuracy fp32→int8", "loss pts (≤0.5)", "agreement",
        ):  # fmt: skip
            table.add_column(column)
        results = {}
        for name, fp32, int8 in pairs:
            console.print(f"measuring {name} …")
            ref, var = measure(fp32, int8, args.rows)
            row = {
                "fp32_bytes": ref.file_bytes,
                "int8_bytes": var.file_bytes,
                "size_ratio": var.file_bytes / ref.file_bytes,
                "speedup_b1": ref.batch(1).latency_p50_us / var.batch(1).latency_p50_us,
                "speedup_b64": ref.batch(64).latency_p50_us / var.batch(64).latency_p50_us,
                "p50_us": {"fp32": [ref.batch(1).latency_p50_us, ref.batch(64).latency_p50_us],
                           "int8": [var.batch(1).latency_p50_us, var.batch(64).latency_p50_us]},
                "peak_b64": [ref.batch(64).peak_memory_bytes, var.batch(64).peak_memory_bytes],
                "accuracy": [ref.accuracy, var.accuracy],
                "loss_points": var.accuracy_drop_points,
                "agreement": var.agreement,
                "validation": var.validation_source,
                "rows": var.validation_size,
            }  # fmt: skip
            results[name] = row
            table.add_row(
                name,
                f"{ref.file_bytes / 1024:.0f} → {var.file_bytes / 1024:.0f} kB",
                f"{row['size_ratio']:.3f}",
                f"{row['speedup_b1']:.2f}×",
                f"{row['speedup_b64']:.2f}×",
                f"{ref.batch(64).peak_memory_bytes / 2**20:.1f} → {var.batch(64).peak_memory_bytes / 2**20:.1f} MB",
                f"{ref.accuracy:.2%} → {var.accuracy:.2%}",
                f"{var.accuracy_drop_points:+.3f}",
                f"{var.agreement:.2%}",
            )
        console.print(table)
        console.print(
            f"validation: {pairs and results[pairs[0][0]]['rows']} rows of {results[pairs[0][0]]['validation']}"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
