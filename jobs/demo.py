"""`vitlabel demo`: the embedded default, end to end on one machine.

Writes the held-out split of scikit-learn's handwritten digits as WebDataset shards on local disk,
labels them with a bundled model (`--model builtin:digits`, the ViT, or `builtin:digits-resnet32`; trained by
jobs/train_digits.py on the other split) on a local
Ray, commits the table, then reads the committed rows back and prints the accuracy.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

from jobs.cli import add_config_args, config_from_args, print_json

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="label the held-out digits with the bundled model and print the accuracy")
    p.add_argument("--workdir", default="demo-output", help="where shards and the table go (default: %(default)s)")
    p.add_argument("--shards", type=int, default=4, help="how many WebDataset shards to write (default: %(default)s)")
    add_config_args(p)
    p.set_defaults(func=main)


def write_digit_shards(root: Path, shards: int) -> dict[str, str]:
    """Held-out digits -> `shards` tar files of PNG + cls members; returns key -> true label."""
    from jobs.train_digits import digits_split
    from pipeline.sources import write_webdataset

    _, held = digits_split()
    truth: dict[str, str] = {}
    samples: list[list[tuple[str, dict[str, bytes]]]] = [[] for _ in range(shards)]
    for i, (img, label) in enumerate(held):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        key = f"digit-{i:05d}"
        truth[key] = str(label)
        samples[i % shards].append((key, {"png": buf.getvalue(), "cls": str(label).encode()}))
    root.mkdir(parents=True, exist_ok=True)
    for n, group in enumerate(samples):
        path = root / f"digits-{n:04d}.tar"
        if not path.exists():
            write_webdataset(str(path), group)
    return truth


def main(args: argparse.Namespace) -> int:
    from pipeline.plan import run
    from pipeline.table import read_table

    work = Path(args.workdir).resolve()
    truth = write_digit_shards(work / "shards", args.shards)
    cfg = config_from_args(args, input=str(work / "shards"), output=str(work / "table"), num_cpus=0)
    if args.dry_run:
        from jobs.run import dry_run

        return dry_run(cfg)
    summary = run(cfg).to_dict()
    table = read_table(cfg.output, columns=["key", "label", "status", "model_digest"])
    rows = [r for r in table.to_pylist() if r["model_digest"] == summary["model_digest"]]
    correct = sum(1 for r in rows if r["status"] == "ok" and r["label"] == truth.get(r["key"]))
    accuracy = correct / len(truth) if truth else 0.0
    print_json({**summary, "held_out_images": len(truth), "rows_in_table": len(rows), "accuracy": round(accuracy, 4)})
    print(f"\nheld-out accuracy: {accuracy:.4f} ({correct}/{len(truth)})")
    print(f"table: {cfg.output}  (try: vitlabel query {cfg.output})")
    return 0 if len(rows) == len(truth) else 1
