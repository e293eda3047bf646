"""The dinov2 family against its reference: transformers' Dinov2 / Dinov2WithRegisters models and BitImageProcessor.

Tiny seeded random models are the oracle, saved as real checkpoint directories with a BitImageProcessor config
(the facebook/dinov2-* layout at a small size: shortest edge 64, crop 56, bicubic, ImageNet mean/std). Their
position tables, class and register tokens and layer scales are re-drawn at a large scale, so that a wrong
position resize, a register in the wrong place or a missing layer scale shows in the outputs. Most configs keep
config.json's image_size 518 (a 37 x 37 position table resized to the 4 x 4 input grid at load); others resize up,
not at all, and to a non-square grid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import parity, reference_rgb, varied_images
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.models import ModelError, describe_model, load_model
from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.dinov2_ckpt import FAMILY, resize_pos_embed
from pipeline.models.registry import open_checkpoint
from pipeline.models.vit_ckpt import FAMILY as VIT
from pipeline.preprocess import decode_image, patchify

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PATCH = 14
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": PATCH}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_hf(tmp: Path, classifier: bool = True, registers: int = 0, n_classes: int = 5, image_size: int = 518,
            crop: int | tuple[int, int] = 56, edge: int = 64, seed: int = 0, weight_std: float = 0.0, **extra):
    """A random seeded HF DINOv2 in eval mode (registers > 0: Dinov2WithRegisters) with its BitImageProcessor,
    saved to `tmp`; layer scales != 1, large position table, class and register tokens.

    weight_std > 0: every weight matrix re-drawn at that std and the tokens kept small, so that the class token's
    direction follows the image (at the 0.02 init it is its own learned vector, cosine ~0.999 between images)."""
    torch.manual_seed(seed)
    labels = {i: f"thing{i}" for i in range(n_classes)}
    kw = {**TINY, "image_size": image_size, "layerscale_value": 0.5, "id2label": labels,
          "label2id": {v: k for k, v in labels.items()}, **extra}
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
        cls = (transformers.Dinov2WithRegistersForImageClassification if classifier
               else transformers.Dinov2WithRegistersModel)
    else:
        cfg = transformers.Dinov2Config(**kw)
        cls = transformers.Dinov2ForImageClassification if classifier else transformers.Dinov2Model
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_embeddings", "cls_token", "register_tokens")):
                p.normal_(0, 0.05 if weight_std else 0.5)
            elif weight_std and p.dim() >= 2:
                p.normal_(0, weight_std)
            elif name.endswith("lambda1"):
                p.uniform_(0.2, 1.5)  # per-channel layer scale, not the constant init
    model.save_pretrained(tmp)
    h, w = (crop, crop) if isinstance(crop, int) else crop
    transformers.BitImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": h, "width": w},
                                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(tmp)
    return model


def pixels(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Noise over one random colour per image (noise alone averages out over the patches)."""
    rng = np.random.default_rng(seed)
    noise, colour = rng.integers(0, 128, size=(n, *hw, 3)), rng.integers(0, 128, size=(n, 1, 1, 3))
    return (noise + colour).astype(np.uint8)  # [B, H, W, 3]


def normalised(px: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(px).double() / 255.0  # [B, H, W, 3]
    x = (x - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)) / torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return x.permute(0, 3, 1, 2).float().contiguous()  # [B, 3, H, W]


def tokens(px: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([patchify(p, PATCH) for p in px]))  # [B, N, P*P*3] uint8


def reference(hf, pv: torch.Tensor, registers: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features, logits or None) of the HF model: pooler_output for a backbone; for a classifier, the classifier's
    input as modeling_dinov2 builds it (cls, mean of the patch tokens after cls and the registers) and its logits."""
    with torch.no_grad():
        out = hf.base_model(pixel_values=pv)  # the Dinov2(WithRegisters)Model
        if not hasattr(hf, "classifier"):
            return out.pooler_output, None
        h = out.last_hidden_state  # [B, 1+R+N, D], final-normed
        feats = torch.cat([h[:, 0], h[:, 1 + registers:].mean(1)], dim=-1)  # [B, 2D]
        return feats, hf(pixel_values=pv).logits


# --- 1. features and logits against transformers ------------------------------------------------------------------

CASES = {  # name -> make_hf kwargs; the grids: config.json's position table -> the processor's crop
    "dinov2-classifier-518": {},  # 37 x 37 -> 4 x 4, bicubic
    "dinov2-model-518": {"classifier": False},
    "dinov2-model-upsized": {"classifier": False, "image_size": 112, "crop": 168, "edge": 192},  # 8 x 8 -> 12 x 12
    "dinov2-swiglu-classifier-same-grid": {"use_swiglu_ffn": True, "image_size": 56},  # 4 x 4 as is
    "registers-classifier-518": {"registers": 4},  # 37 x 37 -> 4 x 4, bicubic, antialiased
    "registers-swiglu-model-non-square": {"classifier": False, "registers": 2, "use_swiglu_ffn": True,
                                          "image_size": 112, "crop": (56, 84), "edge": 96},  # 8 x 8 -> 4 x 6
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_transformers(tmp_path, case):
    kw = CASES[case]
    hf = make_hf(tmp_path / case, **kw)
    bundle = load_model(str(tmp_path / case))
    classifier, registers = kw.get("classifier", True), kw.get("registers", 0)
    assert bundle.info.family == "dinov2" and bundle.info.arch.num_registers == registers
    assert bundle.labels == (tuple(f"thing{i}" for i in range(5)) if classifier else ())
    px = pixels(3, bundle.contract.image_size)
    with torch.no_grad():
        feats = bundle.model.forward_features(tokens(px))
    ref_feats, ref_logits = reference(hf, normalised(px), registers)
    assert feats.shape == ref_feats.shape == (3, 64 if classifier else 32)
    diffs = {"features": (feats - ref_feats).abs().max().item()}
    if classifier:
        with torch.no_grad():
            diffs["logits"] = (bundle.model.forward_head(feats) - ref_logits).abs().max().item()
        assert (bundle.model(tokens(px)) - ref_logits).abs().max().item() < TOL
    else:
        with pytest.raises(ModelError, match="expected a classifier, got a DINOv2 backbone"):
            bundle.model.forward_head(feats)
    print(f"\n{case}: max |diff| vs transformers: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < TOL, diffs
    assert (ref_feats[0] - ref_feats[1]).abs().max() > 100 * TOL  # the features tell the images apart


def test_position_resize_is_transformers_own(tmp_path):
    """resize_pos_embed against Dinov2(WithRegisters)Embeddings.interpolate_pos_encoding, called directly; and the
    two models' resizes differ (antialias), so the parity above would notice the wrong one."""
    for registers in (0, 2):
        emb = make_hf(tmp_path / f"r{registers}", classifier=False, registers=registers).embeddings
        table = emb.position_embeddings.detach()  # [1, 1+37*37, D]
        for grid in ((4, 4), (16, 16), (4, 6), (37, 37), (40, 40)):
            with torch.no_grad():
                ref = emb.interpolate_pos_encoding(torch.zeros(1, 1 + grid[0] * grid[1], 32), grid[0] * PATCH,
                                                   grid[1] * PATCH)  # [1, 1+gh*gw, D]
            ours = resize_pos_embed(table, 37, grid, antialias=registers > 0)
            assert ours.shape == ref.shape and (ours - ref).abs().max() < 1e-6, (registers, grid)
            if grid[0] < 37:  # downsizing: the other model's resize is visibly different
                assert (ours - resize_pos_embed(table, 37, grid, antialias=registers == 0)).abs().max() > 0.01


def test_bf16(tmp_path):
    make_hf(tmp_path / "m", registers=2)
    px = pixels(4, (56, 56))
    with torch.no_grad():
        f32 = load_model(str(tmp_path / "m")).model.forward_features(tokens(px))
        bundle = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in bundle.model.parameters())
        bf16 = bundle.model.forward_features(tokens(px))
        logits = bundle.model.forward_head(bf16)
    assert bf16.dtype == logits.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(bf16.float(), f32).min() > 0.99


# --- 2. preprocessing: our decode + model against AutoImageProcessor (BitImageProcessor) + transformers -------------


def point_classes_at_images(hf, path: Path, images, gain: float = 4.0) -> None:
    """Re-draw the classifier: class c's weight is the centred feature vector of one corpus image, scaled so the
    logits spread by about `gain`. A random backbone's features differ little between images; without this every
    image would get one class at a near-uniform probability and agreement would prove nothing. Saved to `path`."""
    processor = transformers.AutoImageProcessor.from_pretrained(str(path), backend="pil")
    pv = torch.cat([processor(images=reference_rgb(data), return_tensors="pt")["pixel_values"] for _, data in images])
    feats, _ = reference(hf, pv, registers=0)  # [I, 2D]
    centred = feats - feats.mean(0)
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:hf.config.num_labels]
    w = torch.nn.functional.normalize(centred[rows], dim=-1)  # [C, 2D]
    w *= gain / (centred @ w.T).std()
    with torch.no_grad():
        hf.classifier.weight.copy_(w)
        hf.classifier.bias.copy_(-w @ feats.mean(0))
    hf.save_pretrained(path)


@pytest.mark.slow  # over 5 s alone on 2 cores: out of the quick lane
def test_preprocessing_parity_with_autoimageprocessor(tmp_path):
    # facebook/dinov2-*-imagenet1k-1-layer's processor (shortest edge 256, crop 224) at half size: 128 -> 112.
    path = tmp_path / "hf"
    hf = make_hf(path, n_classes=10, crop=112, edge=128)
    point_classes_at_images(hf, path, varied_images())
    processor = transformers.AutoImageProcessor.from_pretrained(str(path), backend="pil")
    assert type(processor).__name__.startswith("BitImageProcessor")
    bundle = load_model(str(path))
    assert (bundle.contract.image_size, bundle.contract.resize, bundle.contract.crop_pct,
            bundle.contract.interpolation) == ((112, 112), "shortest", 0.875, "bicubic")

    def ours(data: bytes) -> torch.Tensor:
        x = torch.from_numpy(decode_image(data, bundle.contract)[0])  # [N, P*P*3] uint8
        with torch.no_grad():
            return bundle.model(x[None])[0].softmax(-1)

    classes: set[int] = set()

    def theirs(img: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            pv = processor(images=img, return_tensors="pt")["pixel_values"]
            assert pv.shape == (1, 3, 112, 112)
            p = hf(pixel_values=pv).logits[0].softmax(-1)
        classes.add(int(p.argmax()))
        return p

    result = parity(ours, theirs, varied_images())
    print(f"\ndinov2 preprocessing parity vs AutoImageProcessor (BitImageProcessor, shortest edge 128, crop 112, "
          f"bicubic, 37 x 37 positions -> 8 x 8): {result}; {len(classes)} distinct top-1 classes")
    assert len(classes) >= 5  # the images are told apart, not all given one class
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02, result


# --- 3. detection, contracts, errors ------------------------------------------------------------------------------


def vit_dir(path: Path) -> Path:
    transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
        patch_size=14, num_labels=3)).save_pretrained(path)
    return path


def test_detection_and_contracts(tmp_path):
    make_hf(tmp_path / "classifier")
    make_hf(tmp_path / "model", classifier=False)
    make_hf(tmp_path / "registers", registers=4)
    make_hf(tmp_path / "registers-model", classifier=False, registers=4)
    for name in ("classifier", "model", "registers", "registers-model"):
        info = describe_model(str(tmp_path / name))
        assert info.family == "dinov2", name
        assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= set(dict(info.files))
        assert (info.contract.image_size, info.contract.patch_size, info.contract.resize, info.contract.crop_pct,
                info.contract.interpolation) == ((56, 56), PATCH, "shortest", 0.875, "bicubic")
        assert info.contract.mean == pytest.approx(IMAGENET_MEAN) and info.contract.std == pytest.approx(IMAGENET_STD)
        assert info.arch.source_grid == 37 and info.arch.grid == (4, 4)
        assert info.arch.pos_antialias == name.startswith("registers")

    # Without preprocessor_config.json: facebook/dinov2-*'s processor (256 -> 224, bicubic, ImageNet): 16 x 16.
    (tmp_path / "model" / "preprocessor_config.json").unlink()
    info = describe_model(str(tmp_path / "model"))
    assert (info.contract.image_size, info.contract.resize, info.contract.crop_pct, info.contract.interpolation,
            info.contract.mean) == ((224, 224), "shortest", 224 / 256, "bicubic", IMAGENET_MEAN)
    assert load_model(str(tmp_path / "model")).model.pos_embed.shape == (1, 1 + 16 * 16, 32)
    # A processor config that leaves things out gets BitImageProcessor's defaults (OpenAI CLIP mean/std), as
    # AutoImageProcessor does.
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 64},
         "crop_size": {"height": 56, "width": 56}}))
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "model"), backend="pil")
    info = describe_model(str(tmp_path / "model"))
    assert info.contract.mean == pytest.approx(tuple(processor.image_mean))
    assert info.contract.std == pytest.approx(tuple(processor.image_std)) and info.contract.interpolation == "bicubic"

    # Neither family claims the other's checkpoint: a ViT directory (model_type "vit"), a timm ViT file.
    vit_dir(tmp_path / "vit")
    save_file({"patch_embed.proj.weight": torch.zeros(32, 3, 14, 14), "pos_embed": torch.zeros(1, 5, 32),
               "cls_token": torch.zeros(1, 1, 32)}, tmp_path / "vit-timm.safetensors")
    for spec in ("vit", "vit-timm.safetensors"):
        assert not FAMILY.recognise(open_checkpoint(str(tmp_path / spec))), spec
    assert describe_model(str(tmp_path / "vit")).family == "vit"
    for spec in ("classifier", "model", "registers"):
        assert not VIT.recognise(open_checkpoint(str(tmp_path / spec))), spec


def test_clear_errors(tmp_path):
    make_hf(tmp_path / "m")
    make_hf(tmp_path / "backbone", classifier=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())

    # The weights file on its own: pass the directory.
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "dinov2-weights.safetensors")
    with pytest.raises(ModelError, match="pass its directory"):
        describe_model(str(tmp_path / "dinov2-weights.safetensors"))

    def variant(name: str, source: str = "m", **changes) -> str:
        bad = tmp_path / name
        shutil.copytree(tmp_path / source, bad)
        before = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**before, **changes}))
        return str(bad)

    with pytest.raises(ModelError, match=r"expected architectures \['Dinov2Model'\] or .*Dinov2Backbone"):
        describe_model(variant("backbone-arch", architectures=["Dinov2Backbone"]))
    with pytest.raises(ModelError, match="expected Dinov2ForImageClassification weights with a classifier"):
        describe_model(variant("no-head", "backbone", architectures=["Dinov2ForImageClassification"]))
    with pytest.raises(ModelError, match=r"expected \(num_channels, hidden_act\) \(3, 'gelu'\)"):
        describe_model(variant("relu", hidden_act="relu"))
    with pytest.raises(ModelError, match="expected dinov2 weights matching"):
        load_model(variant("wider", hidden_size=64))
    with pytest.raises(ModelError, match=r"expected position_embeddings for a 16 x 16 grid .* got 1369 \+ 1"):
        load_model(variant("image-size", image_size=224))  # config.json's image_size disagrees with the table
    make_hf(tmp_path / "registers", registers=2)
    with pytest.raises(ModelError, match=r"(?s)expected dinov2 weights matching .*Unexpected key.*register_tokens"):
        load_model(variant("registers-as-dinov2", "registers", model_type="dinov2",
                           architectures=["Dinov2ForImageClassification"]))
    extra = variant("extra-key")
    sd = load_file(Path(extra) / "model.safetensors")
    save_file({**sd, "dinov2.pooler.dense.weight": torch.zeros(2, 2)}, Path(extra) / "model.safetensors")
    with pytest.raises(ModelError, match="unknown key 'dinov2.pooler.dense.weight'"):
        load_model(extra)
    odd = variant("odd-crop")
    (Path(odd) / "preprocessor_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "m" / "preprocessor_config.json").read_text()),
         "crop_size": {"height": 50, "width": 50}}))
    with pytest.raises(ModelError, match="multiples of patch_size=14"):
        describe_model(odd)
    assert cfg["model_type"] == "dinov2"


# --- 4. through fsspec ---------------------------------------------------------------------------------------------


def test_memory_and_s3_urls(tmp_path, s3):
    import fsspec

    hf = make_hf(tmp_path / "dinov2-reg", registers=4)
    mem = fsspec.filesystem("memory")
    for f in (tmp_path / "dinov2-reg").iterdir():
        mem.pipe(f"/models/dinov2-reg/{f.name}", f.read_bytes())
        s3.put_object(Bucket="test-bucket", Key=f"models/dinov2-reg/{f.name}", Body=f.read_bytes())
    local = describe_model(str(tmp_path / "dinov2-reg"))
    px = pixels(2, (56, 56))
    _, ref = reference(hf, normalised(px), registers=4)
    for url in ("memory://models/dinov2-reg", "s3://test-bucket/models/dinov2-reg"):
        remote = describe_model(url)
        assert (remote.digest, remote.contract, remote.name, remote.labels) == (local.digest, local.contract,
                                                                                "dinov2-reg", local.labels)
        with torch.no_grad():
            assert (load_model(url).model(tokens(px)) - ref).abs().max() < TOL


# --- 5. the pipeline against a plain loop: the classifier, and few-shot on a features-only backbone ---------------


def write_shard(root: Path, images: list[tuple[str, bytes]]) -> None:
    from pipeline.sources import write_webdataset

    root.mkdir()
    write_webdataset(str(root / "shard-000.tar"), [(k, {"jpg": d}) for k, d in images] + [
        ("broken", {"jpg": b"not an image"})])


@pytest.mark.slow
def test_pipeline_classifier_matches_plain_loop(ray_local, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.plan import run
    from pipeline.table import read_table

    images = [(f"img{i:02d}", data) for i, (_, data) in enumerate(varied_images()[:12])]
    point_classes_at_images(make_hf(tmp_path / "model", n_classes=10), tmp_path / "model", images)
    write_shard(tmp_path / "in", images)
    run(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tmp_path / "model"),
                  progress=False, dtype="float32", batch_size=4, preprocess_batch_size=4))
    rows = {r["key"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}

    bundle = load_model(str(tmp_path / "model"))
    with torch.no_grad():
        expected = {key: bundle.labels[int(bundle.model(torch.from_numpy(decode_image(data, bundle.contract)[0])[None])
                                           .argmax())] for key, data in images}
    assert set(rows) == {*expected, "broken"} and len(set(expected.values())) >= 3
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"]
    assert {k: (rows[k]["status"], rows[k]["label"]) for k in expected} == {k: ("ok", v) for k, v in expected.items()}


@pytest.mark.slow
def test_few_shot_on_a_backbone_matches_plain_computation(ray_local, tmp_path):
    """A Dinov2Model directory (no classifier) labels a shard with --examples: prototypes = normalised mean of the
    normalised example features (forward_features: the cls token); label = argmax cosine; score = that cosine."""
    from pipeline.config import JobConfig
    from pipeline.plan import run
    from pipeline.table import read_table

    make_hf(tmp_path / "backbone", classifier=False, seed=1, weight_std=0.1)
    corpus = varied_images()
    examples = {label: [corpus[i][1] for i in idx] for label, idx in
                {"alpha": (0, 3), "beta": (9, 14, 20), "gamma": (25, 31)}.items()}
    for label, files in examples.items():
        (tmp_path / "examples" / label).mkdir(parents=True)
        for n, data in enumerate(files):
            (tmp_path / "examples" / label / f"{n}.jpg").write_bytes(data)
    images = [(f"img{i:02d}", data) for i, (_, data) in enumerate(corpus[36:48])]
    write_shard(tmp_path / "in", images)
    run(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tmp_path / "backbone"),
                  examples=str(tmp_path / "examples"), progress=False, dtype="float32", batch_size=4,
                  preprocess_batch_size=4))
    rows = {r["key"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}

    bundle = load_model(str(tmp_path / "backbone"))
    assert bundle.labels == ()

    def unit_features(datas: list[bytes]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([decode_image(d, bundle.contract)[0] for d in datas]))  # [n, N, P*P*3]
        with torch.no_grad():
            return torch.nn.functional.normalize(bundle.model.forward_features(x).double(), dim=-1)  # [n, D]

    labels = sorted(examples)
    protos = torch.stack([torch.nn.functional.normalize(unit_features(examples[x]).mean(0), dim=0) for x in labels])
    sims = unit_features([d for _, d in images]) @ protos.T  # [I, L] cosines
    top2 = sims.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-ties: the comparison is exact, not lucky
    expected = {key: labels[int(s.argmax())] for (key, _), s in zip(images, sims, strict=True)}
    assert set(rows) == {*expected, "broken"} and len(set(expected.values())) == 3
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"]
    assert {k: (rows[k]["status"], rows[k]["label"]) for k in expected} == {k: ("ok", v) for k, v in expected.items()}
    for (key, _), s in zip(images, sims, strict=True):
        assert abs(rows[key]["score"] - s.max().item()) < TOL, key
