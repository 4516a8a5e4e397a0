"""`kvstore precompute`: the command-line edge of the job (options -> config, model, signals, report); its
options are declared in `connectors.commands`.

The target store comes from the usual configuration (`--config FILE`, `KVSTORE_*`, `--set`), with
shortcuts layered on top: `--to redis://..` / `--to http(s)://..` (with `--cluster`, `--token-file`),
`--codec/--level` (the target section's codec) and `--namespace`. See docs/PRECOMPUTE.md.

Signals: the first SIGINT (Ctrl-C) or SIGTERM stops taking documents, lets the uploads in flight finish,
prints the summary and exits 130 (143 for SIGTERM); a second one aborts at once (the manifest stays valid).
Exit codes: 0 everything done; 1 some entries or uploads failed (listed in the summary); 2 bad usage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from kvstore.config import StoreConfig, load_config

_MAX_LISTED_FAILURES = 20


def config_overrides(args) -> dict[str, str]:
    """The job's shortcuts as `--set`-style overrides (applied after the user's own)."""
    from connectors.precompute.errors import PrecomputeError

    out: dict[str, str] = {}
    section = None
    if args.to:
        if args.to.startswith(("redis://", "rediss://", "unix://")):
            section = "redis"
            out["redis.url"] = args.to
            if args.cluster:
                out["redis.cluster"] = "true"
        elif args.to.startswith(("http://", "https://")):
            section = "sidecar"
            out["sidecar.url"] = args.to
        else:
            raise PrecomputeError(f"--to takes a redis://, rediss://, unix:// or http(s):// URL, got {args.to!r}")
    elif args.cluster:
        raise PrecomputeError("--cluster goes with --to redis://...")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise PrecomputeError(f"cannot read --token-file {args.token_file}: {e}") from None
        if not token:
            raise PrecomputeError(f"--token-file {args.token_file} is empty")
        out["sidecar.token"] = token
    if args.namespace:
        out["namespace"] = args.namespace
    out["_section"] = section or ""
    return out


def run_precompute_command(config: StoreConfig, args, sets: dict[str, str]) -> int:
    import torch

    from connectors.commands import PRECOMPUTE_MODES
    from connectors.precompute.corpus import count_entries, read_corpus
    from connectors.precompute.job import PrecomputeJob, PrecomputeOptions
    from connectors.precompute.target import build_target, describe_target, target_section
    from kvstore.keys import ChunkKind

    overrides = config_overrides(args)
    section = overrides.pop("_section") or None
    if overrides:
        config = load_config(args.config, os.environ, {**sets, **overrides})
    section = section or target_section(config)
    if args.codec is not None or args.level is not None:
        name = args.codec or getattr(config, section).codec
        overrides[f"{section}.codec"] = name  # checked (name and level) as the config is loaded
        overrides[f"{section}.codec_level"] = "" if args.level is None else str(args.level)
        config = load_config(args.config, os.environ, {**sets, **overrides})
    getattr(config, section).make_codec()  # a codec level it does not take fails here, before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = PrecomputeOptions(
        kind=ChunkKind[PRECOMPUTE_MODES[args.mode]], namespace=config.namespace, chunk_tokens=config.chunk_tokens,
        passage_tokens=args.passage_tokens, add_special_tokens=args.add_special_tokens, max_tokens=args.max_tokens,
        batch_size=args.batch_size or (8 if device.startswith("cuda") else 1), upload_workers=args.workers,
        dry_run=args.dry_run, levels=config.adaptive.levels if config.adaptive is not None else ())
    corpus_path = Path(args.corpus)
    manifest = Path(args.manifest) if args.manifest else corpus_path.with_name(corpus_path.name + ".manifest.jsonl")
    entries = read_corpus(corpus_path, id_field=args.id_field, text_field=args.text_field)  # checks the path
    model, tokenizer, model_name = _load_model(args.model, args.dtype, device)
    target = build_target(config, section)
    total = count_entries(corpus_path)
    bar = _progress_bar(total, args.progress)
    job = PrecomputeJob(model, tokenizer, target, options, manifest, progress=bar)
    where = describe_target(config, section)
    print(f"precompute: {total} entries of {corpus_path} -> {where}; model {model_name} ({job.fingerprint}) on "
          f"{device}, {args.mode} mode, chunks of {options.chunk_tokens} tokens, namespace {options.namespace!r}"
          + (" [dry run]" if options.dry_run else ""), file=sys.stderr)
    stopped = {"signal": None}

    def on_signal(signum, frame):
        if stopped["signal"] is not None:
            raise KeyboardInterrupt
        stopped["signal"] = signum
        job.request_stop()
        print(f"\nprecompute: {signal.Signals(signum).name}: finishing the uploads in flight, then stopping "
              "(again to abort)", file=sys.stderr)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = job.run(entries)
    except KeyboardInterrupt:
        print("precompute: aborted; rerun the same command to finish (nothing uploaded is computed again)",
              file=sys.stderr)
        return 130
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        target.close()
    report = summary.to_json()
    report.update(manifest=None if options.dry_run else str(manifest), target=where, model=job.fingerprint,
                  mode=args.mode, namespace=options.namespace, chunk_tokens=options.chunk_tokens)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(report, f, indent=2, default=str)
    _print_summary(summary, report)
    if summary.interrupted:
        return 128 + int(stopped["signal"] or signal.SIGINT)
    return 0 if summary.ok else 1


def _load_model(name_or_dir: str, dtype_name: str, device: str):
    import torch

    from connectors.models import ModelSourceError, load_model
    from connectors.precompute.errors import PrecomputeError

    try:
        model, tokenizer = load_model(name_or_dir, getattr(torch, dtype_name), device)
    except ModelSourceError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise PrecomputeError(f"cannot load the model {name_or_dir} on {device}: {e}") from None
    return model, tokenizer, Path(str(name_or_dir)).name


def _progress_bar(total: int, mode: bool | None):
    from tqdm import tqdm

    # disable=None: shown only on a terminal, so logs of batch runs stay clean.
    return tqdm(total=total, unit="doc", file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                disable=None if mode is None else not mode)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_summary(s, report: dict) -> None:
    would = "would compute" if s.dry_run else "computed"
    lines = [
        f"documents {s.documents}: {s.units} units, {s.units_present} already complete, "
        f"{'to compute ' + str(s.units - s.units_present - s.units_without_chunks) if s.dry_run else str(s.units_uploaded) + ' uploaded'}"
        f"{f', {s.units_without_chunks} shorter than one chunk' if s.units_without_chunks else ''}",
        f"chunks: {s.chunks_computed} {would}, {s.chunks_skipped} skipped (already stored)"
        + ("" if s.dry_run else f", {s.chunks_uploaded} uploaded and verified"),
        f"tokens: {s.tokens} in units, {s.tokens_computed} {'to prefill' if s.dry_run else 'prefilled'}"
        + ("" if s.dry_run else f"; {report['tokens_per_s']:,.0f} tok/s over {s.wall_s:.1f} s wall "
                                f"({s.compute_s:.1f} s in the model)"),
    ]
    if not s.dry_run:
        ratio = report["compression_ratio"]
        lines.append(f"bytes: {_fmt_bytes(s.kv_bytes)} of KV -> {_fmt_bytes(s.stored_bytes)} stored"
                     + (f" ({ratio:.2f}x)" if ratio else ""))
    if s.target_evictions:
        lines.append(f"WARNING: the target evicted {s.target_evictions} entries during the run (it is full): "
                     "raise its capacity or the evicted chunks are gone")
    lines.append(f"failed: {s.failed} ({s.bad_entries} bad entries, {s.units_failed} units)")
    for f in s.failures[:_MAX_LISTED_FAILURES]:
        lines.append(f"  {f.id} ({f.source}): {f.reason}")
    if len(s.failures) > _MAX_LISTED_FAILURES:
        lines.append(f"  ... and {len(s.failures) - _MAX_LISTED_FAILURES} more (--summary FILE lists all)")
    if s.interrupted:
        lines.append("interrupted: rerun the same command to finish the rest")
    if report.get("manifest"):
        lines.append(f"manifest: {report['manifest']}")
    print("\n".join(lines))
