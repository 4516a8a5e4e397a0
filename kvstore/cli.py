"""The `kvstore` command line: `stats`, `verify`, `clear`, `demo`, `serve`, `precompute`.

Configuration comes from `--config FILE` (TOML), the environment (`KVSTORE_*`) and `--set
section.field=value`; see `kvstore.config`. Exit codes: 0 success, 1 a check failed (verify found bad
records, the demo read back wrong KV), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kvstore.config import StoreConfig, build_store, load_config
from kvstore.errors import KVStoreError


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise KVStoreError(f"--set takes section.field=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_stats(config: StoreConfig, args) -> int:
    store = build_store(config)
    try:
        s = store.stats()
        print(f"chunk_tokens {config.chunk_tokens}, write_through {config.write_through}")
        for tier in store.tiers:
            u = s["tiers"][tier.name]["usage"]
            where = f" at {tier.root}" if hasattr(tier, "root") else ""
            print(f"{tier.name:5s}{where}: {u.entries} chunks, {_fmt_bytes(u.used_bytes)} of {_fmt_bytes(u.capacity_bytes)}"
                  f" ({100 * u.used_bytes / max(u.capacity_bytes, 1):.1f}%), {u.pinned} pinned")
            life = getattr(tier, "lifetime_stats", None)
            if life:
                looked = life["hits"] + life["misses"]
                rate = f"{100 * life['hits'] / looked:.1f}%" if looked else "n/a"
                print(f"       lifetime: {life['hits']} hits, {life['misses']} misses (hit rate {rate}), "
                      f"{life['puts']} puts, {life['evictions']} evictions, {life['corrupt']} corrupt, "
                      f"read {_fmt_bytes(life['bytes_read'])}, written {_fmt_bytes(life['bytes_written'])}")
            quarantined = len(list(tier.quarantined())) if hasattr(tier, "quarantined") else 0
            if quarantined:
                print(f"       {quarantined} file(s) in quarantine at {tier.quarantine_dir}")
    finally:
        store.close()
    return 0


def cmd_verify(config: StoreConfig, args) -> int:
    if config.disk is None:
        print("no disk tier configured: nothing to verify")
        return 0
    tier = config.disk.build()
    try:
        report = tier.verify()
    finally:
        tier.close()
    print(f"checked {report.checked} records under {config.disk.path}: {len(report.bad)} bad")
    for path, reason in report.bad:
        print(f"  quarantined {path}: {reason}")
    return 1 if report.bad else 0


def cmd_clear(config: StoreConfig, args) -> int:
    store = build_store(config)
    try:
        n = store.clear(namespace=args.namespace)
    finally:
        store.close()
    print(f"removed {n} chunk entries" + (f" of namespace {args.namespace!r}" if args.namespace else ""))
    return 0


def cmd_demo(config: StoreConfig, args) -> int:
    from connectors.demo import run_demo

    return run_demo(config)


def cmd_serve(config: StoreConfig, args) -> int:
    from kvstore.service import serve

    return serve(config, host=args.host, port=args.port, insecure_no_auth=args.insecure_no_auth)


def cmd_precompute(config: StoreConfig, args) -> int:
    from connectors.precompute.command import run_precompute_command

    return run_precompute_command(config, args, _parse_sets(args.set))


def _add_precompute(sub) -> None:
    # Choices spelled out here: importing the job (torch, transformers) would slow every other command.
    pc = sub.add_parser("precompute", help="compute the KV of a corpus and upload it to the store (docs/PRECOMPUTE.md)",
                        description="Resumable, idempotent: rerun the same command after an interruption; "
                                    "chunks already stored are skipped without computing them.")
    pc.add_argument("corpus", help="JSONL file ({\"id\": ..., \"text\": ...} per line) or a folder of text files")
    pc.add_argument("--model", help="Hugging Face model directory (default: the shipped model)")
    pc.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="model dtype; part of the KV's keys (default float32)")
    pc.add_argument("--device", help="model device (default: cuda if available, else cpu)")
    pc.add_argument("--mode", choices=("prefix", "passages"), default="prefix",
                    help="prefix: full prefix chunks of whole documents; passages: standalone chunks for blend/RAG")
    pc.add_argument("--passage-tokens", type=int, help="passages mode: split documents into passages of N tokens "
                    "(default: each document is one passage)")
    pc.add_argument("--to", metavar="URL", help="target: redis://host:port/db, or http(s)://host:port of a `kvstore serve` "
                    "(default: the configured store's slowest tier, the disk tier out of the box)")
    pc.add_argument("--cluster", action="store_true", help="the --to redis URL is a Redis Cluster node")
    pc.add_argument("--token-file", help="bearer token of the --to sidecar (or set KVSTORE_SIDECAR_TOKEN)")
    pc.add_argument("--codec", help="codec of the uploaded records (default: the target section's codec)")
    pc.add_argument("--level", type=int, help="codec level, where the codec has levels")
    pc.add_argument("--namespace", help="namespace of the keys (default: the configured namespace)")
    pc.add_argument("--manifest", help="manifest path (default: CORPUS.manifest.jsonl)")
    pc.add_argument("--summary", metavar="PATH", help="also write the summary as JSON to PATH")
    pc.add_argument("--dry-run", action="store_true", help="report what would be computed; compute and upload nothing")
    pc.add_argument("--batch-size", type=int, help="documents per forward (default: 8 on CUDA, 1 on CPU)")
    pc.add_argument("--max-tokens", type=int, help="longest document (default: the model's context length)")
    pc.add_argument("--add-special-tokens", action="store_true",
                    help="let the tokenizer add BOS etc. (match how your prompts are tokenized)")
    pc.add_argument("--workers", type=int, default=2, help="upload threads (default 2)")
    pc.add_argument("--id-field", default="id", help="JSONL field of the document id (default id)")
    pc.add_argument("--text-field", default="text", help="JSONL field of the text (default text)")
    pc.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    pc.set_defaults(func=cmd_precompute)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstore", description="KV-cache store for LLM inference.")
    p.add_argument("--config", help="TOML config file (default: $KVSTORE_CONFIG, else built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a setting, e.g. --set disk.path=/data/kv --set memory.capacity=4GiB")
    p.add_argument("-v", "--verbose", action="store_true", help="log warnings and details")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="tiers, usage, counts and hit rates").set_defaults(func=cmd_stats)
    sub.add_parser("verify", help="check every disk record; quarantine bad ones; exit 1 if any").set_defaults(func=cmd_verify)
    c = sub.add_parser("clear", help="remove stored chunks (pinned ones stay)")
    c.add_argument("--namespace", help="only this namespace")
    c.set_defaults(func=cmd_clear)
    sub.add_parser("demo", help="long-document QA and a multi-turn chat with the shipped model, with and without the store").set_defaults(func=cmd_demo)
    s = sub.add_parser("serve", help="run the sidecar HTTP service over the configured store (docs/SERVICE.md)")
    s.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default: server.port, 8420)")
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="serve without bearer tokens (only when no server.tokens_file is set; loopback only)")
    s.set_defaults(func=cmd_serve)
    _add_precompute(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, os.environ, _parse_sets(args.set))
        return args.func(config, args)
    except KVStoreError as e:
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
