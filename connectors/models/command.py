"""`kvstore model {list,fetch,path}`: the registered models and their one-time conversion.

- `list`: each registered model, where it comes from and whether its folder is ready.
- `fetch NAME [--gguf FILE]`: convert now (from the installed package, the package index, or FILE),
  print the folder. Idempotent: a ready folder is only checked.
- `path NAME`: print the folder (converting first if needed), for `vllm serve $(kvstore model path ...)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from connectors.models.registry import MODELS, is_converted, default_models_dir, model_path


def run_model_command(args) -> int:
    if args.model_command == "list":
        root = default_models_dir()
        for spec in MODELS.values():
            if spec.source is None:
                where, state = f"ships with kvstore ({spec.shipped})", "ready"
            else:
                folder = root / spec.folder
                where = f"{spec.source.requirement}: {spec.source.file}"
                state = f"ready at {folder}" if is_converted(folder, spec.source) else "not converted yet"
            print(f"{spec.name:14s} {spec.title:24s} {where}; {state}")
        return 0
    gguf = Path(args.gguf).expanduser() if getattr(args, "gguf", None) else None
    path = model_path(args.name, gguf=gguf)
    if args.model_command == "fetch":
        print(f"{args.name}: ready at {path}", file=sys.stderr)
    print(path)
    return 0
