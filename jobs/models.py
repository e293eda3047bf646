"""`vitlabel models`: the model families, the checkpoint formats each loads, and what label and score mean."""

from __future__ import annotations

import argparse

from jobs.cli import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model families, their checkpoint formats and outputs")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.models import BUILTINS, families

    rows = [{"family": f.name, "title": f.title, "formats": list(f.formats), "outputs": f.outputs,
             "zero_shot": f.text_embeddings is not None} for f in families().values()]
    if args.json:
        print_json({"families": rows, "builtins": [f"builtin:{b}" for b in BUILTINS]})
        return 0
    for r in rows:
        print(f"{r['family']}: {r['title']}")
        for fmt in r["formats"]:
            print(f"  format: {fmt}")
        print(f"  {r['outputs']}")
    print("any family with features: --examples DIR labels few-shot (label: nearest prototype, score: its cosine "
          "similarity)")
    print("builtins: " + ", ".join(f"builtin:{b}" for b in BUILTINS))
    return 0
