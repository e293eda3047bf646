"""The bench's settings: CLI flags -> one `Settings`, with the job layouts it measures. Imports nothing heavy."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
# --family names -> the registry family that loads them (pipeline.models.families()).
FAMILIES = {"vit": "vit", "resnet50": "resnet", "mobilenetv2": "mobilenetv2", "dinov2": "dinov2", "siglip": "siglip"}
FAMILY_ALIASES = {"resnet-50": "resnet50", "resnet": "resnet50", "mobilenet_v2": "mobilenetv2",
                  "dinov2-s14": "dinov2", "siglip-b16": "siglip"}
DEFAULTS = {"sizes": "1000,3000,20000,50000", "compare_size": 3000, "unique_images": 2000, "shard_images": 250,
            "seconds": 8.0, "wave_corpus": "40x25", "wave_repeats": 3, "loop_sizes": "20000", "family_seconds": 60.0}
QUICK = {"sizes": "150,300", "compare_size": 300, "unique_images": 100, "shard_images": 50, "seconds": 2.0,
         "wave_corpus": "8x6", "wave_repeats": 1, "loop_sizes": "", "family_seconds": 5.0}
SKIPPABLE = ("s3", "ray-docs", "plain-loop", "scaling", "job-scale", "all-cpus", "bound-again", "waves")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="bench-output", help="corpus, models and scratch tables (default: %(default)s)")
    p.add_argument("--out", default="bench.json", help="write the results here as JSON (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"a few hundred images, short timings, job layout only, bound once (sizes {QUICK['sizes']}, "
                        f"compare {QUICK['compare_size']}, waves {QUICK['wave_corpus']}, no other loop size)")
    p.add_argument("--family", default="",
                   help=f"comma list of model families to measure instead of the ViT suite: {', '.join(FAMILIES)} "
                        "or all; each gets decode per core, model-only, end-to-end and their ratios")
    p.add_argument("--family-images", type=int,
                   help="images of each family's e2e run (default: its model-only rate x --family-seconds, "
                        "whole shards, at least one shard, at most --compare-size)")
    p.add_argument("--family-seconds", type=float,
                   help=f"model seconds each family's e2e run aims at (default: {DEFAULTS['family_seconds']:g}, "
                        f"quick {QUICK['family_seconds']:g})")
    p.add_argument("--sizes", help=f"corpus sizes for the scaling runs (default: {DEFAULTS['sizes']})")
    p.add_argument("--compare-size", type=int, help=f"images for the side-by-side variants (default: "
                                                    f"{DEFAULTS['compare_size']})")
    p.add_argument("--loop-sizes", help="more sizes at which `vitlabel run` meets the plain transformers loop, "
                                        f"besides --compare-size (default: {DEFAULTS['loop_sizes']}; quick: none)")
    p.add_argument("--wave-corpus", help="SHARDSxIMAGES of the wave-cost runs (--wave-shards 2 against 0); with "
                                         "IMAGES = --shard-images the 0 run is the default-layout run at that size, "
                                         f"run once (default: {DEFAULTS['wave_corpus']})")
    p.add_argument("--wave-repeats", type=int, help="pairs of wave-cost runs (0 then 2, alternating); the ratio is "
                                                    f"their median (default: {DEFAULTS['wave_repeats']}; quick: 1)")
    p.add_argument("--unique-images", type=int, help=f"distinct photos in the pool (default: "
                                                     f"{DEFAULTS['unique_images']})")
    p.add_argument("--shard-images", type=int, help=f"images per WebDataset shard (default: "
                                                    f"{DEFAULTS['shard_images']})")
    p.add_argument("--seconds", type=float, help=f"duration of each decode and model-only timing (default: "
                                                 f"{DEFAULTS['seconds']:g})")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny", help="ViT-?/16 at 224 px, 1000 classes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32", "float16"), default="auto",
                   help="model dtype, the same for every variant (default: auto = bfloat16 on a GPU or on a CPU with "
                        "AMX-BF16/AVX512-BF16, else float32)")
    p.add_argument("--batch-size", type=int, help="images per forward (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs given to Ray and the plain loop (0: all)")
    p.add_argument("--actors", type=int, default=1, help="predictor actors (default: %(default)s)")
    p.add_argument("--cpus-per-actor", type=float,
                   help="Ray CPUs per actor; torch threads = max(1, int(this)) (default: 1 on CPU)")
    p.add_argument("--preprocess-cpus", type=float, help="Ray CPUs per preprocessing task (default: 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (our variants)")
    p.add_argument("--skip", default="", help=f"comma list of what to skip: {', '.join(SKIPPABLE)} (all-cpus: the "
                                              "second layout; bound-again: the repeated bound; waves: the wave cost; "
                                              "job-scale: the job layout's "
                                              "run at the largest loop size)")
    p.add_argument("--seed", type=int, default=0, help="corpus and weights seed (default: %(default)s)")


@dataclass(frozen=True)
class Layout:
    """How the job's CPUs (and GPUs) are split between predictor actors and preprocessing tasks."""

    name: str
    actors: int
    cpus_per_actor: float
    threads_per_actor: int  # torch intra-op threads per actor (the e2e job uses max(1, int(cpus_per_actor)))
    gpus_per_actor: float
    preprocess_cpus: float

    def describe(self) -> str:
        where = f"{self.gpus_per_actor:g} GPU" if self.gpus_per_actor else f"{self.threads_per_actor} thread"
        return (f"{self.actors} actor x {where} ({self.cpus_per_actor:g} CPU), "
                f"preprocessing {self.preprocess_cpus:g} CPU/task")


@dataclass
class Settings:
    workdir: Path
    sizes: list[int]
    compare_size: int
    loop_sizes: list[int]  # sizes where `vitlabel run` meets the plain loop: compare_size first
    wave_shards_total: int  # the wave-cost corpus: this many shards ...
    wave_shard_images: int  # ... of this many images
    wave_repeats: int  # pairs of wave-cost runs; the ratio is their median
    unique_images: int
    shard_images: int
    seconds: float
    model_size: str
    device: str
    dtype: str
    dtype_reason: str
    batch_size: int
    num_cpus: int
    num_gpus: int
    layout: Layout  # the job's layout (`vitlabel run`'s defaults): scaling, S3, waves and the ratios use it
    compile: bool
    skip: set[str]
    seed: int
    families: list[str]  # --family: bench family names (keys of FAMILIES); empty: the ViT suite
    family_images: int | None
    family_seconds: float

    @property
    def all_cpus_layout(self) -> Layout | None:
        """CPU only: one single-threaded actor per CPU, preprocessing squeezed into the CPU left over.

        The model gets (almost) every core, so e2e trades its ratio to the (bigger) bound for absolute speed.
        """
        if self.device == "cuda" or self.num_cpus < 2 or "all-cpus" in self.skip:
            return None
        n = self.num_cpus
        return Layout("all-cpus", actors=n, cpus_per_actor=(n - 0.5) / n, threads_per_actor=1, gpus_per_actor=0.0,
                      preprocess_cpus=0.5)

    @property
    def default_layout(self) -> Layout:
        """What `vitlabel run` lays out by default here (the scaling runs use it): on a CPU-only machine the fused
        layout, one single-threaded actor per CPU that reads, decodes and labels its shards; on a GPU the job
        layout (decode tasks + one actor per GPU)."""
        if self.device == "cuda":
            return self.layout
        return Layout("default", actors=self.num_cpus, cpus_per_actor=1.0, threads_per_actor=1, gpus_per_actor=0.0,
                      preprocess_cpus=0.0)

    @property
    def decode_cores(self) -> float:
        """CPUs left to preprocessing in the job layout (the decode bound is this x images/s per core)."""
        actor_cpus = self.layout.actors * self.layout.cpus_per_actor
        return max(self.layout.preprocess_cpus, self.num_cpus - actor_cpus)


def vit_title(size: str) -> str:
    dim, depth, heads = MODEL_SIZES[size]
    return f"ViT-{size}/16 (dim {dim}, depth {depth}, heads {heads}), 224 px, 1000 classes, seeded random weights"


def config_section(s: Settings) -> dict[str, object]:
    """The settings as the results' `config` section."""
    layouts = [s.layout] + ([s.all_cpus_layout] if s.all_cpus_layout and not s.families else [])
    return {**{k: v for k, v in asdict(s).items() if k not in ("workdir", "skip", "layout")},
            "skip": sorted(s.skip), "workdir": str(s.workdir), "layouts": {x.name: asdict(x) for x in layouts},
            "model": vit_title(s.model_size)}


def _ints(flag: str, value: str) -> list[int]:
    try:
        return sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"vitlabel bench: {flag}: expected comma-separated integers, got {value!r}") from None


def _families(value: str) -> list[str]:
    names = [FAMILY_ALIASES.get(x.strip().lower(), x.strip().lower()) for x in value.split(",") if x.strip()]
    if "all" in names:
        return list(FAMILIES)
    bad = [x for x in names if x not in FAMILIES]
    if bad:
        raise SystemExit(f"vitlabel bench: --family: expected a comma list of {', '.join(FAMILIES)} or all, got {bad}")
    return list(dict.fromkeys(names))


def pick_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(dtype, why): auto is bfloat16 on a GPU or a CPU with native bf16 matmuls, else float32."""
    from jobs.bench.machine import cpu_info

    if dtype != "auto":
        return dtype, "--dtype"
    if device == "cuda":
        return "bfloat16", "auto: GPU"
    cpu = cpu_info()
    return ("bfloat16" if cpu["bf16_fast"] else "float32"), f"auto: {cpu['bf16_note']}"


def settings_from_args(args: argparse.Namespace) -> Settings:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vitlabel bench: --device cuda: expected a visible CUDA device, got none")
    quick = args.quick
    d = {**DEFAULTS, **QUICK} if quick else DEFAULTS
    size_list = _ints("--sizes", args.sizes or str(d["sizes"]))
    num_cpus = args.num_cpus or os.cpu_count() or 1
    cuda = device == "cuda"
    cpus_per_actor = args.cpus_per_actor if args.cpus_per_actor is not None else 1.0
    layout = Layout("job", actors=args.actors, cpus_per_actor=cpus_per_actor,
                    threads_per_actor=1 if cuda else max(1, int(cpus_per_actor)), gpus_per_actor=1.0 if cuda else 0.0,
                    preprocess_cpus=args.preprocess_cpus if args.preprocess_cpus is not None else 1.0)
    compare = args.compare_size or int(d["compare_size"])
    extra_loop = str(args.loop_sizes if args.loop_sizes is not None else d["loop_sizes"])
    wave = str(args.wave_corpus or d["wave_corpus"]).lower().split("x")
    if len(wave) != 2 or not all(x.strip().isdigit() and int(x) > 0 for x in wave):
        raise SystemExit(f"vitlabel bench: --wave-corpus: expected SHARDSxIMAGES, got {args.wave_corpus!r}")
    dtype, why = pick_dtype(args.dtype, device)
    s = Settings(
        workdir=Path(args.workdir).resolve(),
        sizes=[n for n in size_list if n > 0],
        compare_size=compare,
        loop_sizes=[compare] + [n for n in _ints("--loop-sizes", extra_loop) if n > 0 and n != compare],
        wave_shards_total=int(wave[0]), wave_shard_images=int(wave[1]),
        wave_repeats=max(1, args.wave_repeats or int(d["wave_repeats"])),
        unique_images=args.unique_images or int(d["unique_images"]),
        shard_images=args.shard_images or int(d["shard_images"]),
        seconds=args.seconds or float(d["seconds"]),
        model_size=args.model_size, device=device, dtype=dtype, dtype_reason=why,
        batch_size=args.batch_size or (256 if cuda else 32),
        num_cpus=num_cpus, num_gpus=torch.cuda.device_count() if cuda else 0, layout=layout,
        compile=args.compile, seed=args.seed,
        skip={x.strip() for x in args.skip.split(",") if x.strip()} | ({"all-cpus", "bound-again"} if quick else set()),
        families=_families(args.family),
        family_images=args.family_images,
        family_seconds=args.family_seconds or float(d["family_seconds"]),
    )
    unknown = s.skip - set(SKIPPABLE)
    if unknown:
        raise SystemExit(f"vitlabel bench: --skip: expected a comma list of {', '.join(SKIPPABLE)}, got "
                         f"{sorted(unknown)}")
    if not s.sizes and "scaling" not in s.skip:
        raise SystemExit("vitlabel bench: --sizes: expected at least one positive size")
    if not cuda and layout.actors * layout.cpus_per_actor + layout.preprocess_cpus > num_cpus:
        raise SystemExit(f"vitlabel bench: expected actors x cpus-per-actor + preprocess-cpus <= num-cpus ({num_cpus}) "
                         f"so that preprocessing can run, got {layout.actors} x {layout.cpus_per_actor:g} + "
                         f"{layout.preprocess_cpus:g}")
    return s
