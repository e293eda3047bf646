"""`vitlabel bench --family`: each model family at full size, measured as the ViT is.

Each model is built in code with seeded random weights through transformers' own classes, in the layout of
the hub checkpoint it stands for, and saved once under WORKDIR/models (speed does not depend on the weights):

    vit          ViT-<--model-size>/16, 224 px, 1000 classes (our save_checkpoint: a HF ViT directory)
    resnet50     ResNetForImageClassification, microsoft/resnet-50's config, ConvNext processor (224, crop 0.875)
    mobilenetv2  MobileNetV2ForImageClassification, google/mobilenet_v2_1.0_224's config (1001 classes, TF padding)
    dinov2       Dinov2ForImageClassification ViT-S/14 (384 wide, 12 layers, 6 heads, layerscale), 1000 classes,
                 BiT processor (256 -> crop 224, bicubic)
    siglip       SiglipModel B/16 at 224, a small sentencepiece tokenizer trained here; zero-shot over a short
                 vocabulary (JobConfig.labels)

A model the registry describes without labels gets them the way a run would: a text tower -> the vocabulary,
else few-shot prototypes from an examples folder of the corpus. Then, per family and with the job layout:
decode images/s per core with its contract, the model-only bound, one e2e run, and
e2e / min(model-only bound, decode bound) where the decode bound is decode per core x the CPUs left to it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from jobs.bench.corpus import Corpus
from jobs.bench.harness import bench_session, in_job_process
from jobs.bench.measure import ModelSpec, e2e_job, measure_decode, model_inputs, model_only_job
from jobs.bench.settings import FAMILIES, MODEL_SIZES, Settings, vit_title

log = logging.getLogger(__name__)

BUILD_VERSION = 1
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RESCALE = 1 / 255
# SigLIP's zero-shot vocabulary: short, as a user's --labels would be.
VOCABULARY = ("cat", "dog", "bird", "horse", "flower", "tree", "temple", "pagoda", "roof", "sky", "cloud", "mountain",
              "river", "lake", "boat", "car", "red car", "bicycle", "bridge", "street", "building", "garden",
              "bee", "leaf", "stone", "statue", "lantern", "window", "door", "person", "child", "food")
FEW_SHOT = (10, 2)  # a features-only model: labels x example images per label


TITLES = {
    "resnet50": "ResNet-50 (microsoft/resnet-50 config), 224 px (shortest 256, crop 224), 1000 classes",
    "mobilenetv2": "MobileNetV2 1.0 (google/mobilenet_v2_1.0_224 config, TF padding), 224 px, 1001 classes",
    "dinov2": "DINOv2 ViT-S/14 (dim 384, depth 12, heads 6, layerscale) + linear head, 224 px, 1000 classes",
    "siglip": f"SigLIP ViT-B/16 (dim 768, depth 12, heads 12), 224 px, zero-shot over {len(VOCABULARY)} labels",
}


# --- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_dir(workdir: Path, name: str, s: Settings) -> Path:
    tag = f"vit-{s.model_size}-16" if name == "vit" else name
    return workdir / "models" / f"{tag}-bench-s{s.seed}"


def ensure_checkpoint(name: str, s: Settings) -> str:
    """The family's bench checkpoint directory, built (in a process of its own) unless already there."""
    path = checkpoint_dir(s.workdir, name, s)
    done = path / ".bench-done"
    if not (done.exists() and json.loads(done.read_text()) == {"version": BUILD_VERSION}):
        shutil.rmtree(path, ignore_errors=True)
        log.info("bench: building the %s checkpoint in %s", name, path)
        in_job_process(save_checkpoint_job, name, str(path), s.model_size, s.seed, memory=False)
        done.write_text(json.dumps({"version": BUILD_VERSION}))
    return str(path)


def save_checkpoint_job(name: str, path: str, model_size: str, seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if name == "vit":
        _save_vit(out, model_size)
    else:
        {"resnet50": _save_resnet50, "mobilenetv2": _save_mobilenetv2, "dinov2": _save_dinov2,
         "siglip": _save_siglip}[name](out)
    return {"path": path}


def _save_vit(out: Path, size: str) -> None:
    from pipeline.config import ImageContract
    from pipeline.models.vit import ViT, ViTConfig
    from pipeline.models.vit_ckpt import save_checkpoint

    dim, depth, heads = MODEL_SIZES[size]
    cfg = ViTConfig(image_size=(224, 224), patch_size=16, dim=dim, depth=depth, heads=heads, mlp_dim=4 * dim,
                    num_classes=1000)
    contract = ImageContract(image_size=(224, 224), patch_size=16)  # HF ViTImageProcessor: squash, bilinear, 0.5
    save_checkpoint(ViT(cfg), contract, [f"class_{i:03d}" for i in range(1000)], str(out), out.name)


def _labels(n: int, first: str | None = None) -> dict[str, Any]:
    names = ([first] if first else []) + [f"class_{i:03d}" for i in range(n - (1 if first else 0))]
    return {"id2label": dict(enumerate(names)), "label2id": {x: i for i, x in enumerate(names)}}


def _save_hf(model: Any, out: Path, preprocessor: dict[str, Any]) -> None:
    model.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def _save_resnet50(out: Path) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                       layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False, **_labels(1000))
    _save_hf(ResNetForImageClassification(cfg), out, {
        "image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3,
        "rescale_factor": RESCALE, "size": {"shortest_edge": 224}})


def _save_mobilenetv2(out: Path) -> None:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(num_channels=3, image_size=224, depth_multiplier=1.0, depth_divisible_by=8, min_depth=8,
                            expand_ratio=6, output_stride=32, first_layer_is_expansion=True, finegrained_output=True,
                            hidden_act="relu6", tf_padding=True, classifier_dropout_prob=0.2,
                            **_labels(1001, first="background"))
    _save_hf(MobileNetV2ForImageClassification(cfg), out, {
        "image_processor_type": "MobileNetV2ImageProcessor", "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": RESCALE,
        "size": {"shortest_edge": 256}})


def _bit_processor() -> dict[str, Any]:
    return {"image_processor_type": "BitImageProcessor", "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3,
            "rescale_factor": RESCALE, "size": {"shortest_edge": 256}}


def _save_dinov2(out: Path) -> None:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                       image_size=518, layerscale_value=1.0, use_swiglu_ffn=False, **_labels(1000))
    _save_hf(Dinov2ForImageClassification(cfg), out, _bit_processor())


def _save_siglip(out: Path) -> None:
    import sentencepiece as spm
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    sentences = [t.format(w) for w in VOCABULARY for t in ("{}", "a photo of a {}.", "This is a photo of {}.")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=256,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    (out / "spiece.model").write_bytes(model.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(out / "spiece.model"), model_max_length=64)
    tokenizer.save_pretrained(str(out))
    eos = tokenizer.convert_tokens_to_ids("</s>")
    tower = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    cfg = SiglipConfig(text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 64,
                                    "pad_token_id": eos, "eos_token_id": eos, "bos_token_id": eos},
                       vision_config={**tower, "image_size": 224, "patch_size": 16})
    _save_hf(SiglipModel(cfg), out, {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor", "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 3, "rescale_factor": RESCALE, "size": {"height": 224, "width": 224}})


def model_spec(name: str, s: Settings, corpus: Corpus) -> tuple[ModelSpec, Any]:
    """The bench checkpoint of `name` as a run takes it, and its ModelInfo (labels decided as a user would)."""
    from pipeline.models import describe_model, families

    path = ensure_checkpoint(name, s)
    family = FAMILIES[name]
    info = describe_model(path, family)
    if info.labels:
        return ModelSpec(path, family), info
    if families()[family].text_embeddings is not None:
        return ModelSpec(path, family, labels=",".join(VOCABULARY)), info
    return ModelSpec(path, family, examples=str(corpus.examples(*FEW_SHOT))), info


# --- measuring ------------------------------------------------------------------------------------------


def family_images(s: Settings, bound: float) -> int:
    """e2e images: --family-images, else about --family-seconds of the model's bound, in whole shards."""
    if s.family_images:
        return s.family_images
    k = s.shard_images
    want = math.ceil(bound * s.family_seconds / k) * k
    return max(k, min(want, max(k, s.compare_size)))


def measure_family(name: str, s: Settings, corpus: Corpus, scratch: Path) -> dict[str, Any]:
    spec, info = model_spec(name, s, corpus)
    head = "zero-shot" if spec.labels else "few-shot" if spec.examples else "classifier"
    log.info("bench: %s: decode per core", name)
    decode = measure_decode(corpus, info.contract, s.seconds)
    log.info("bench: %s: model-only", name)
    inputs = model_inputs(corpus, info.contract, s.batch_size)
    bound = in_job_process(model_only_job, s, spec, inputs, [s.layout])["layouts"][0]["images_per_s"]
    n = family_images(s, bound)
    log.info("bench: %s: e2e, %d images", name, n)
    e2e = in_job_process(e2e_job, s, s.layout, spec, str(corpus.shards(n)), str(scratch / f"family-{name}"))
    shutil.rmtree(scratch / f"family-{name}", ignore_errors=True)
    decode_bound = round(decode * s.decode_cores, 2)
    slower = min(bound, decode_bound)
    return {
        "status": "ok", "family": info.family, "title": vit_title(s.model_size) if name == "vit" else TITLES[name],
        "head": head, "labels": len(spec.labels.split(",")) if spec.labels else len(info.labels) or FEW_SHOT[0],
        "input": {"layout": info.contract.layout, "shape": list(info.contract.input_shape),
                  "resize": info.contract.resize, "crop_pct": info.contract.crop_pct,
                  "interpolation": info.contract.interpolation},
        "decode_images_per_s_per_core": decode, "decode_cores": s.decode_cores,
        "decode_bound_images_per_s": decode_bound,
        "model_only_images_per_s": bound, "e2e": e2e,
        "e2e_vs_model_only": round(e2e["images_per_s"] / bound, 3) if bound else None,
        "slower_bound": "model-only" if bound <= decode_bound else "decode",
        "e2e_vs_slower_bound": round(e2e["images_per_s"] / slower, 3) if slower else None,
    }


def run_families(s: Settings, argv: list[str] | None = None) -> dict[str, Any]:
    from pipeline.models import families

    with bench_session(s, argv) as (result, corpus, scratch):
        loaded = families()
        rows: dict[str, Any] = {}
        for name in s.families:
            if FAMILIES[name] not in loaded:
                rows[name] = {"status": "skipped", "family": FAMILIES[name],
                              "reason": f"the registry has no {FAMILIES[name]!r} family (loaded: {sorted(loaded)})"}
                continue
            try:
                rows[name] = measure_family(name, s, corpus, scratch)
            except Exception as e:  # one family's failure is reported with the others' figures
                log.exception("bench: family %s failed", name)
                rows[name] = {"status": "failed", "family": FAMILIES[name],
                              "error": f"{type(e).__name__}: {e}"[:2000]}
        result["families"] = rows
        result["targets"] = {f"{name}: e2e >= 0.85 x the slower bound": (
            None if x.get("e2e_vs_slower_bound") is None else x["e2e_vs_slower_bound"] >= 0.85)
            for name, x in rows.items()}
    return result
