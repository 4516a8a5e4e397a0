"""The `kvstore` command line: a registry of subcommands, and the store's own: `stats`, `verify`,
`clear`, `serve`.

Packages above this one add theirs with `register(Command(...))` (`connectors.commands`: `demo`,
`precompute`); the `kvstore` console script (`connectors.cli.main`) imports them and runs `main`, so the
command line composes the packages from above and this package imports none of them. `python -m
kvstore` offers the store's own commands.

Configuration comes from `--config FILE` (TOML), the environment (`KVSTORE_*`) and `--set
section.field=value`; see `kvstore.config`. Exit codes: 0 success, 1 a check failed (verify found bad
records, the demo read back wrong KV), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

from kvstore.config import StoreConfig, build_store, load_config
from kvstore.errors import KVStoreError


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: `run(config, args)` -> exit code; `arguments(parser)` adds its own options."""

    name: str
    help: str
    run: Callable[[StoreConfig, argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None


_COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a subcommand (in the order of registration); a name is registered once."""
    if command.name in _COMMANDS:
        raise ValueError(f"command {command.name!r} is registered twice")
    _COMMANDS[command.name] = command
    return command


def parse_sets(items: list[str]) -> dict[str, str]:
    """`--set section.field=value` items -> overrides for `load_config`."""
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


def cmd_serve(config: StoreConfig, args) -> int:
    from kvstore.service import serve

    return serve(config, host=args.host, port=args.port, insecure_no_auth=args.insecure_no_auth)


def _serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default: server.port, 8420)")
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="serve without bearer tokens (only when no server.tokens_file is set; loopback only)")


def _clear_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--namespace", help="only this namespace")


for _command in (
    Command("stats", "tiers, usage, counts and hit rates", cmd_stats),
    Command("verify", "check every disk record; quarantine bad ones; exit 1 if any", cmd_verify),
    Command("clear", "remove stored chunks (pinned ones stay)", cmd_clear, _clear_arguments),
    Command("serve", "run the sidecar HTTP service over the configured store (docs/SERVICE.md)", cmd_serve,
            _serve_arguments),
):
    register(_command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstore", description="KV-cache store for LLM inference.",
                                epilog="The kvstore console script (also: python -m connectors) adds the commands "
                                       "that the packages above the store own: demo, precompute.")
    p.add_argument("--config", help="TOML config file (default: $KVSTORE_CONFIG, else built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a setting, e.g. --set disk.path=/data/kv --set memory.capacity=4GiB")
    p.add_argument("-v", "--verbose", action="store_true", help="log warnings and details")
    sub = p.add_subparsers(dest="command", required=True)
    for command in _COMMANDS.values():
        sp = sub.add_parser(command.name, help=command.help, description=command.description)
        if command.arguments is not None:
            command.arguments(sp)
        sp.set_defaults(func=command.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, os.environ, parse_sets(args.set))
        return args.func(config, args)
    except KVStoreError as e:
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
