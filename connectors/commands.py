"""The subcommands of the `kvstore` command line that `connectors` owns: `demo`, `precompute` and `model`.

Registered with `kvstore.cli.register` when this module is imported (by `connectors.cli`, the console
script). Their options are spelled out here and their work is imported only when they run: importing the
job or the demo (torch, transformers) would slow every other command.
"""

from __future__ import annotations

import argparse

from kvstore.cli import Command, parse_sets, register
from kvstore.config import StoreConfig

PRECOMPUTE_MODES = {"prefix": "PREFIX", "passages": "STANDALONE"}  # --mode -> ChunkKind member


def run_demo(config: StoreConfig, args: argparse.Namespace) -> int:
    from connectors.demo import run_demo

    return run_demo(config, args.model)


def _demo_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default; converted once on first use), "
                   "tiny (the project's 4-layer model, fast) or a Hugging Face model folder")


def run_model(config: StoreConfig, args: argparse.Namespace) -> int:
    from connectors.models.command import run_model_command

    return run_model_command(args)


def _model_arguments(m: argparse.ArgumentParser) -> None:
    msub = m.add_subparsers(dest="model_command", required=True)
    msub.add_parser("list", help="registered models and whether each is ready")
    f = msub.add_parser("fetch", help="convert a model into the cache now (from its package, or --gguf FILE)")
    f.add_argument("name", nargs="?", default="smollm2-135m", help="model name (default smollm2-135m)")
    f.add_argument("--gguf", help="a local copy of the model's GGUF file (verified by sha256)")
    p = msub.add_parser("path", help="print the model's folder (converting it first if needed)")
    p.add_argument("name", nargs="?", default="smollm2-135m")


def run_precompute(config: StoreConfig, args: argparse.Namespace) -> int:
    from connectors.precompute.command import run_precompute_command

    return run_precompute_command(config, args, parse_sets(args.set))


def _precompute_arguments(pc: argparse.ArgumentParser) -> None:
    pc.add_argument("corpus", help="JSONL file ({\"id\": ..., \"text\": ...} per line) or a folder of text files")
    pc.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, or a Hugging Face model "
                    "folder: the model whose KV is stored (it is part of the keys)")
    pc.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="model dtype; part of the KV's keys (default float32)")
    pc.add_argument("--device", help="model device (default: cuda if available, else cpu)")
    pc.add_argument("--mode", choices=tuple(PRECOMPUTE_MODES), default="prefix",
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


register(Command("demo", "long-document QA and a multi-turn chat on a real model, with and without the store",
                 run_demo, _demo_arguments))
register(Command("precompute", "compute the KV of a corpus and upload it to the store (docs/PRECOMPUTE.md)",
                 run_precompute, _precompute_arguments,
                 description="Resumable, idempotent: rerun the same command after an interruption; "
                             "chunks already stored are skipped without computing them."))
register(Command("model", "the models the demo and benchmarks use: list, fetch (convert once), path", run_model,
                 _model_arguments))
