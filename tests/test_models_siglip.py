"""The siglip family against its reference: transformers' SiglipModel / Siglip2Model, processors and tokenizers.

Tiny seeded random models are the oracle, each saved as a real checkpoint directory with its own image processor
and a tokenizer built here: a sentencepiece model trained on a few sentences (spiece.model, SiglipTokenizer: the
google/siglip-* layout) or a tokenizers BPE (tokenizer.json: GemmaTokenizer in a SiglipModel directory, the
google/siglip2-*-224 layout; Siglip2Tokenizer in a Siglip2Model directory, the NaFlex layout). Our image tower
runs on uint8 patch tokens; the text embeddings are transformers' own (`FAMILY.text_embeddings`), so the
zero-shot scores are compared end to end with `logits_per_image.sigmoid()`.

SigLIP 2 (NaFlex) runs at one fixed square grid, isqrt(max_num_patches) a side: compared with Siglip2Model on
the processor's output for a square image, where the processor picks that same grid (with padding patches when
max_num_patches is not a square, and position embeddings resized down or up).
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import parity, reference_rgb, varied_images
from PIL import Image

from pipeline.models import ModelError, describe_model, heads, load_model
from pipeline.models.registry import open_checkpoint
from pipeline.models.siglip_ckpt import FAMILY
from pipeline.preprocess import decode_image, patchify

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TOL = 1e-4
PATCH = 8
SENTENCES = ["a photo of a cat.", "a photo of a dog.", "a photo of a car.", "this is a photo of a red bird.",
             "the quick brown fox jumps over the lazy dog.", "an image of a small green frog."]
LABELS = ["cat", "dog", "car"]
PROMPTS = ["a photo of a {}.", "an image of a {}."]
PARITY_LABELS = ["cat", "dog", "car", "bird", "fox", "red", "brown", "quick", "lazy", "frog"]
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# (logit_scale, logit_bias): trained SigLIPs have about log(117) and -12.9; these put the random towers' cosines
# (about -0.3 to 0) at sigmoid scores of 0.2 to 0.9, so score comparisons are not between numbers near 0.
LOGITS = (math.log(10.0), 2.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spiece_model(sentences: list[str]) -> bytes:
    """A tiny sentencepiece unigram model: pad 0, eos 1 (</s>, SigLIP's pad and eos), unk 2, no bos."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 20), model_writer=buf, vocab_size=36,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    return buf.getvalue()


def bpe_vocab(extra: str = "") -> dict[str, int]:
    """A character-level BPE vocabulary (Gemma's special tokens first)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in sorted(set("".join(SENTENCES) + extra)) + ["▁"]:
        vocab.setdefault(c, len(vocab))
    return vocab


def save_tokenizer(tmp: Path, kind: str, extra: str = "") -> None:
    if kind == "spiece":
        (tmp / "src.model").write_bytes(spiece_model(SENTENCES + ([extra] if extra else [])))
        transformers.SiglipTokenizer(vocab_file=str(tmp / "src.model"), model_max_length=64).save_pretrained(tmp)
        (tmp / "src.model").unlink()
    elif kind == "gemma":  # google/siglip2-*-224: a SiglipModel with Gemma's tokenizer.json (no model_max_length)
        transformers.GemmaTokenizer(vocab=bpe_vocab(extra), merges=[]).save_pretrained(tmp)
    else:
        transformers.Siglip2Tokenizer(vocab=bpe_vocab(extra), merges=[]).save_pretrained(tmp)


def make_siglip(tmp: Path, image: int = 32, tokenizer: str = "spiece", seed: int = 0):
    """A random seeded SiglipModel in eval mode with its processor (google/siglip-* layout), saved to `tmp`."""
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        text_config={**TOWER, "vocab_size": 48, "max_position_embeddings": 64},
        vision_config={**TOWER, "image_size": image, "patch_size": PATCH})
    return _save(transformers.SiglipModel(cfg), tmp, tokenizer,
                 transformers.SiglipImageProcessor(size={"height": image, "width": image}))


def make_siglip2(tmp: Path, max_num_patches: int = 16, num_patches: int = 64, seed: int = 0):
    """A random seeded Siglip2Model (NaFlex) with its processor and a tokenizer.json, saved to `tmp`."""
    torch.manual_seed(seed)
    cfg = transformers.Siglip2Config(
        text_config={**TOWER, "vocab_size": 48, "max_position_embeddings": 64},
        vision_config={**TOWER, "patch_size": PATCH, "num_patches": num_patches})
    return _save(transformers.Siglip2Model(cfg), tmp, "siglip2",
                 transformers.Siglip2ImageProcessor(max_num_patches=max_num_patches, patch_size=PATCH))


def _save(model, tmp: Path, tokenizer: str, image_processor):
    model.eval()
    with torch.no_grad():
        model.logit_scale.fill_(LOGITS[0])
        model.logit_bias.fill_(LOGITS[1])
    model.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    save_tokenizer(tmp, tokenizer)
    return model


def processor(path: Path):
    return transformers.AutoProcessor.from_pretrained(str(path), backend="pil")


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)  # [B, H, W, 3]


def our_features(bundle, px: np.ndarray) -> torch.Tensor:
    tokens = torch.from_numpy(np.stack([patchify(p, bundle.contract.patch_size) for p in px]))  # [B, N, P*P*3]
    with torch.no_grad():
        return bundle.model.forward_features(tokens)  # [B, D]


def hf_text_kwargs(model) -> dict:
    """What the model's docs pass with the processor: padding="max_length" (SigLIP 2 at 224: max_length=64)."""
    return {"padding": "max_length", **({"max_length": 64} if model.config.model_type == "siglip" else {})}


def hf_kwargs(model, proc) -> dict:
    """hf_text_kwargs, and for Siglip2Processor the image processor's own max_num_patches and patch_size: its class
    defaults (256, 16) override preprocessor_config.json's when called through the processor (transformers 5.24)."""
    if model.config.model_type == "siglip":
        return hf_text_kwargs(model)
    ip = proc.image_processor
    return {**hf_text_kwargs(model), "max_num_patches": ip.max_num_patches, "patch_size": ip.patch_size}


# --- 1. image embeddings: our tower against get_image_features ----------------------------------------------------

CASES = {  # name -> (builder, kwargs, image side)
    "siglip": (make_siglip, {}, 32),
    "siglip2-downsized-pos": (make_siglip2, {"max_num_patches": 16, "num_patches": 64}, 32),
    "siglip2-padded": (make_siglip2, {"max_num_patches": 20, "num_patches": 64}, 32),  # 16 patches + 4 padding
    "siglip2-upsized-pos": (make_siglip2, {"max_num_patches": 100, "num_patches": 16}, 80),
}


@pytest.mark.parametrize("case", list(CASES))
def test_image_embeddings_match_transformers(tmp_path, case):
    build, kw, side = CASES[case]
    hf = build(tmp_path / case, **kw)
    bundle = load_model(str(tmp_path / case))
    assert bundle.info.family == "siglip" and bundle.labels == ()
    assert bundle.contract.image_size == (side, side) and bundle.contract.patch_size == PATCH
    px = pixels(3, side)
    inputs = processor(tmp_path / case).image_processor(images=[Image.fromarray(p) for p in px], return_tensors="pt")
    if "spatial_shapes" in inputs:  # the processor picked our fixed grid for a square image
        assert inputs["spatial_shapes"].tolist() == [[side // PATCH] * 2] * 3
    with torch.no_grad():
        ref = hf.get_image_features(**inputs).pooler_output  # [B, D]
    diff = (our_features(bundle, px) - ref).abs().max().item()
    print(f"\n{case}: image embedding max |diff| vs transformers get_image_features: {diff:.2e}")
    assert diff < TOL and ref.abs().max() > 0.1


def test_bf16(tmp_path):
    make_siglip(tmp_path / "m")
    px = pixels(4, 32)
    f32 = our_features(load_model(str(tmp_path / "m")), px)
    bundle = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bundle.model.parameters())
    bf16 = our_features(bundle, px)
    assert bf16.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(bf16.float(), f32).min() > 0.99
    with pytest.raises(ModelError, match="expected a classifier"):
        bundle.model.forward_head(bf16)


# --- 2. zero-shot scores: heads.zero_shot + our features against SiglipModel(...).logits_per_image ---------------

ZERO_SHOT = {"siglip-spiece": (make_siglip, {}), "siglip-gemma-tokenizer.json": (make_siglip, {"tokenizer": "gemma"}),
             "siglip2-tokenizer.json": (make_siglip2, {})}


@pytest.mark.parametrize("case", list(ZERO_SHOT))
def test_zero_shot_scores_match_transformers(tmp_path, case):
    build, kw = ZERO_SHOT[case]
    hf = build(tmp_path / case, **kw)
    spec = str(tmp_path / case)
    bundle, ck, proc = load_model(spec), open_checkpoint(spec), processor(tmp_path / case)
    px = pixels(4, 32, seed=1)
    images = [Image.fromarray(p) for p in px]
    ours_f = our_features(bundle, px)

    # One prompt: exactly the processor + model's sigmoid.
    head = heads.zero_shot(LABELS, PROMPTS[:1], lambda texts: FAMILY.text_embeddings(ck, texts))
    assert head.kind == "zero-shot" and (head.scale, head.bias) == pytest.approx((10.0, 2.0))
    ours = head.scores(ours_f, head.to(torch.device("cpu")))  # [B, L]
    inputs = proc(text=[PROMPTS[0].format(x) for x in LABELS], images=images, return_tensors="pt",
                  **hf_kwargs(hf, proc))
    with torch.no_grad():
        ref = hf(**inputs).logits_per_image.sigmoid()  # [B, L]
    one = (ours - ref).abs().max().item()
    assert one < TOL and ref.max() - ref.min() > 0.05  # not a degenerate comparison

    # Two prompts: each label's text embedding is the normalised mean of its normalised prompt embeddings.
    head = heads.zero_shot(LABELS, PROMPTS, lambda texts: FAMILY.text_embeddings(ck, texts))
    ours = head.scores(ours_f, head.to(torch.device("cpu")))
    texts = [p.format(x) for x in LABELS for p in PROMPTS]
    tin = proc.tokenizer(texts, return_tensors="pt", truncation=True, **{"max_length": 64, **hf_text_kwargs(hf)})
    with torch.no_grad():
        t = torch.nn.functional.normalize(hf.get_text_features(**tin).pooler_output, dim=-1)  # [L*P, D]
        t = torch.nn.functional.normalize(t.view(len(LABELS), len(PROMPTS), -1).mean(1), dim=-1)  # [L, D]
        img = torch.nn.functional.normalize(hf.get_image_features(**proc.image_processor(
            images=images, return_tensors="pt")).pooler_output, dim=-1)  # [B, D]
        ref = torch.sigmoid(img @ t.T * hf.logit_scale.exp() + hf.logit_bias)  # [B, L]
    two = (ours - ref).abs().max().item()
    print(f"\n{case}: zero-shot sigmoid max |diff| vs transformers: one prompt {one:.2e}, two prompts {two:.2e}")
    assert two < TOL


# --- 3. preprocessing: our decode + tower against the checkpoint's processor + transformers ----------------------


def parity_scores(path: Path, hf):
    """(ours, theirs, the reference's top-1 labels so far) for `parity`: one image's zero-shot sigmoid scores over
    PARITY_LABELS (SigLIP's own probabilities, used as parity's "probabilities"): our uint8 path vs the checkpoint's
    AutoImageProcessor + transformers, the same text embeddings on both sides."""
    bundle, ck, proc = load_model(str(path)), open_checkpoint(str(path)), processor(path)
    head = heads.zero_shot(PARITY_LABELS, PROMPTS[:1], lambda texts: FAMILY.text_embeddings(ck, texts))
    weight = head.to(torch.device("cpu"))
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(path), backend="pil")
    assert type(image_processor).__name__ == type(proc.image_processor).__name__

    def ours(data: bytes) -> torch.Tensor:
        x, _, _ = decode_image(data, bundle.contract)
        with torch.no_grad():
            return head.scores(bundle.model.forward_features(torch.from_numpy(x)[None]), weight)[0]

    tops: list[int] = []  # the reference's top-1 label of each image

    def theirs(img: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            feats = hf.get_image_features(**image_processor(images=img, return_tensors="pt")).pooler_output
            scores = head.scores(feats, weight)[0]
        tops.append(int(scores.argmax()))
        return scores

    return ours, theirs, tops


def test_preprocessing_parity_siglip(tmp_path):
    """SiglipImageProcessor (squash to 64 x 64, bicubic, mean/std 0.5) against our decode_image."""
    hf = make_siglip(tmp_path / "m", image=64)
    ours, theirs, tops = parity_scores(tmp_path / "m", hf)
    result = parity(ours, theirs, varied_images())
    print(f"\nsiglip preprocessing parity vs AutoImageProcessor (SiglipImageProcessor, 64 px squash, bicubic; "
          f"sigmoid scores over {len(PARITY_LABELS)} labels): {result}; {len(set(tops))} distinct top-1 labels")
    assert len(set(tops)) >= 3  # the top-1 depends on the image: agreement is not trivial
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02, result


def test_preprocessing_parity_siglip2_fixed_grid(tmp_path):
    """Siglip2ImageProcessor (NaFlex) against our fixed square grid: equal on square images (the processor picks
    our grid); non-square images are squashed by us and kept in aspect by NaFlex: measured, not asserted."""
    hf = make_siglip2(tmp_path / "m", max_num_patches=64, num_patches=64)
    ours, theirs, tops = parity_scores(tmp_path / "m", hf)
    sizes = {name: name.rsplit("-", 1)[1].split(".")[0].split("x") for name, _ in varied_images()}  # "..-WxH.ext"
    square = tuple(x for x in varied_images() if sizes[x[0]][0] == sizes[x[0]][1])
    result = parity(ours, theirs, square)
    assert len(square) >= 8 and len(set(tops)) >= 2
    other = parity(ours, theirs, tuple(x for x in varied_images() if x not in square))
    print(f"\nsiglip2 preprocessing parity vs AutoImageProcessor (Siglip2ImageProcessor, max_num_patches 64 -> fixed "
          f"8 x 8 grid, 64 px, bilinear; sigmoid scores): square images {result}; non-square (squash vs NaFlex "
          f"aspect, not asserted) {other}")
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02, result


# --- 4. detection, digests, errors ------------------------------------------------------------------------------


def test_detection_and_contracts(tmp_path):
    make_siglip(tmp_path / "siglip", image=48)
    make_siglip2(tmp_path / "siglip2", max_num_patches=36, num_patches=64)
    one, two = describe_model(str(tmp_path / "siglip")), describe_model(str(tmp_path / "siglip2"))
    assert (one.family, two.family) == ("siglip", "siglip")
    assert (one.contract.image_size, one.contract.interpolation, one.contract.resize) == ((48, 48), "bicubic", "squash")
    assert (two.contract.image_size, two.contract.interpolation, two.contract.resize) == ((48, 48), "bilinear",
                                                                                          "squash")
    assert one.contract.mean == (0.5,) * 3 and one.contract.std == (0.5,) * 3
    assert (one.arch.source_grid, two.arch.source_grid) == (0, 8) and two.arch.grid == (6, 6)
    assert {"spiece.model", "tokenizer_config.json", "preprocessor_config.json"} <= set(dict(one.files))
    assert "tokenizer.json" in dict(two.files)
    assert one.labels == two.labels == ()

    # Not ours: a ViT and a ResNet directory, a timm ViT file.
    transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3)).save_pretrained(tmp_path / "vit")
    transformers.ResNetForImageClassification(transformers.ResNetConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8], embedding_size=8, num_labels=3)).save_pretrained(
        tmp_path / "resnet")
    from safetensors.torch import save_file

    save_file({"patch_embed.proj.weight": torch.zeros(32, 3, 8, 8), "pos_embed": torch.zeros(1, 17, 32),
               "cls_token": torch.zeros(1, 1, 32)}, tmp_path / "vit-timm.safetensors")
    for spec in ("vit", "resnet", "vit-timm.safetensors"):
        assert not FAMILY.recognise(open_checkpoint(str(tmp_path / spec))), spec
    assert (describe_model(str(tmp_path / "vit")).family, describe_model(str(tmp_path / "resnet")).family) == (
        "vit", "resnet")


def test_tokenizer_files_are_in_the_digest(tmp_path):
    for kind, vocab_file in (("spiece", "spiece.model"), ("siglip2", "tokenizer.json")):
        path = tmp_path / kind
        (make_siglip if kind == "spiece" else make_siglip2)(path)
        before = describe_model(str(path)).digest
        assert describe_model(str(path)).digest == before  # stable
        old = (path / vocab_file).read_bytes()
        save_tokenizer(path, "spiece" if kind == "spiece" else "siglip2", extra="zebra? 42 xylophones!")
        assert (path / vocab_file).read_bytes() != old
        assert describe_model(str(path)).digest != before, kind
        (path / vocab_file).write_bytes(old)
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
        assert describe_model(str(path)).digest != before, kind


def test_clear_errors(tmp_path):
    make_siglip(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())

    # The weights file on its own: pass the directory.
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "siglip-weights.safetensors")
    with pytest.raises(ModelError, match="pass its directory"):
        describe_model(str(tmp_path / "siglip-weights.safetensors"))

    def variant(name: str, **changes) -> str:
        bad = tmp_path / name
        shutil.copytree(tmp_path / "m", bad)
        (bad / "config.json").write_text(json.dumps({**cfg, **changes}))
        return str(bad)

    with pytest.raises(ModelError, match=r"expected architectures \['SiglipModel'\].*SiglipForImageClassification"):
        describe_model(variant("classifier", architectures=["SiglipForImageClassification"]))
    no_head = variant("no-head", vision_config={**cfg["vision_config"], "vision_use_head": False})
    with pytest.raises(ModelError, match="vision_use_head"):
        describe_model(no_head)
    bigger = variant("bigger", vision_config={**cfg["vision_config"], "image_size": 48})
    with pytest.raises(ModelError, match=r"expected a \(48, 48\) input .* got \(32, 32\)"):
        describe_model(bigger)  # the processor's size disagrees with the tower's
    wider = variant("wider", vision_config={**cfg["vision_config"], "hidden_size": 64})
    with pytest.raises(ModelError, match="expected siglip weights matching"):
        load_model(wider)
    (tmp_path / "m" / "spiece.model").unlink()
    (tmp_path / "m" / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match=r"expected a tokenizer \(spiece.model or tokenizer.model or tokenizer.json"):
        FAMILY.text_embeddings(open_checkpoint(str(tmp_path / "m")), ["a cat"])


def test_memory_url(tmp_path):
    import fsspec

    make_siglip(tmp_path / "m")
    mem = fsspec.filesystem("memory")
    for f in (tmp_path / "m").iterdir():
        mem.pipe(f"/models/siglip-tiny/{f.name}", f.read_bytes())
    url = "memory://models/siglip-tiny"
    local, remote = describe_model(str(tmp_path / "m")), describe_model(url)
    assert (remote.digest, remote.contract, remote.name) == (local.digest, local.contract, "siglip-tiny")
    px = pixels(2, 32)
    assert (our_features(load_model(url), px) - our_features(load_model(str(tmp_path / "m")), px)).abs().max() == 0
    emb, scale, bias = FAMILY.text_embeddings(open_checkpoint(url), ["a photo of a cat."])
    emb_local, *_ = FAMILY.text_embeddings(open_checkpoint(str(tmp_path / "m")), ["a photo of a cat."])
    assert emb.shape == (1, 32) and emb.dtype == np.float32 and np.array_equal(emb, emb_local)
    assert (scale, bias) == pytest.approx((10.0, 2.0))


# --- 5. zero-shot labelling through the pipeline (moto S3) ------------------------------------------------------


def png(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_zero_shot_pipeline_on_s3(ray_local, s3, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.plan import run
    from pipeline.sources import write_webdataset
    from pipeline.table import read_table

    hf = make_siglip(tmp_path / "siglip-tiny")
    for f in (tmp_path / "siglip-tiny").iterdir():
        s3.put_object(Bucket="test-bucket", Key=f"models/siglip-tiny/{f.name}", Body=f.read_bytes())
    images = {f"img{i:02d}": png(p) for i, p in enumerate(pixels(10, 32, seed=3))}
    samples = [(k, {"png": v}) for k, v in images.items()]
    write_webdataset("s3://test-bucket/shards/shard-0.tar", samples[:5] + [("broken", {"jpg": b"not an image"})])
    write_webdataset("s3://test-bucket/shards/shard-1.tar", samples[5:])

    summary = run(JobConfig(input="s3://test-bucket/shards", output="s3://test-bucket/labels",
                            model="s3://test-bucket/models/siglip-tiny", labels=",".join(LABELS),
                            prompt=(PROMPTS[0],), top_k=3, dtype="float32", progress=False, batch_size=4,
                            preprocess_batch_size=4))
    assert summary.counts["images"] == 11
    rows = {r["key"]: r for r in read_table("s3://test-bucket/labels").to_pylist()}
    assert set(rows) == {*images, "broken"}
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"]

    keys = sorted(images)
    proc = processor(tmp_path / "siglip-tiny")
    inputs = proc(text=[PROMPTS[0].format(x) for x in LABELS], images=[reference_rgb(images[k]) for k in keys],
                  padding="max_length", return_tensors="pt")
    with torch.no_grad():
        ref = hf(**inputs).logits_per_image.sigmoid().numpy()  # [I, L]
    assert len({int(r.argmax()) for r in ref}) >= 2  # the vocabulary's top-1 varies
    for k, r in zip(keys, ref, strict=True):
        row = rows[k]
        order = np.argsort(-r)
        assert row["status"] == "ok" and row["label"] == LABELS[order[0]], k
        assert abs(row["score"] - r.max()) < TOL, (k, row["score"], r.max())
        assert row["topk_labels"] == [LABELS[i] for i in order]
        assert np.abs(np.array(row["topk_scores"]) - r[order]).max() < TOL
        assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
