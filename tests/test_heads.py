"""Heads through the real plan: few-shot prototypes on the digits, the model version, the actor's digest check.

Few-shot runs the bundled digits ViT as a feature extractor: 10 examples per digit from the training split, the
held-out digits labelled by their nearest prototype (cosine). Zero-shot (SigLIP) has its own tests in
test_models_siglip.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _digits import png_bytes

from pipeline.config import ConfigError, JobConfig
from pipeline.models import Head, ModelError, heads, load_model
from pipeline.plan import plan_shards, resolve, run, vocabulary
from pipeline.predict import Predictor
from pipeline.preprocess import decode_image
from pipeline.sources import write_webdataset
from pipeline.table import read_table

EXAMPLES_PER_LABEL = 10


@pytest.fixture(scope="module")
def digits():
    from jobs.train_digits import digits_split

    return digits_split()


def write_examples(fs_root: str, train, per_label: int = EXAMPLES_PER_LABEL) -> dict[str, list[bytes]]:
    """examples/<digit>/<n>.png from the training split; returns label -> the PNG bytes written."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(fs_root)
    written: dict[str, list[bytes]] = {}
    for img, label in train:
        files = written.setdefault(str(label), [])
        if len(files) < per_label:
            data = png_bytes(img)
            fs.makedirs(f"{root}/{label}", exist_ok=True)
            fs.pipe_file(f"{root}/{label}/{len(files):02d}.png", data)
            files.append(data)
    return written


def plain_prototypes(examples: dict[str, list[bytes]]) -> tuple[list[str], np.ndarray]:
    """Prototypes by hand: normalised mean of the normalised features of each label's examples."""
    bundle = load_model("builtin:digits")
    labels = sorted(examples)
    protos = []
    with torch.no_grad():
        for label in labels:
            x = torch.from_numpy(np.stack([decode_image(b, bundle.contract)[0] for b in examples[label]]))
            f = torch.nn.functional.normalize(bundle.model.forward_features(x).double(), dim=-1)
            protos.append(torch.nn.functional.normalize(f.mean(0), dim=0).numpy())
    return labels, np.stack(protos)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_few_shot_digits_end_to_end(ray_local, tmp_path, digits, where, request):
    train, held = digits
    if where == "s3":
        request.getfixturevalue("s3")
        examples_url, input_url, output = ("s3://test-bucket/examples", "s3://test-bucket/shards",
                                           "s3://test-bucket/labels")
    else:
        examples_url, input_url, output = (str(tmp_path / "examples"), str(tmp_path / "shards"),
                                           str(tmp_path / "labels"))
    examples = write_examples(examples_url, train)
    n = 120 if where == "local" else 60
    truth = {}
    samples = [[], []]
    for i, (img, label) in enumerate(held[:n]):
        truth[f"d{i:04d}"] = str(label)
        samples[i % 2].append((f"d{i:04d}", {"png": png_bytes(img)}))
    samples[0].append(("broken", {"jpg": b"not a jpeg"}))
    for k, s in enumerate(samples):
        write_webdataset(f"{input_url}/shard-{k}.tar", s)

    cfg = JobConfig(input=input_url, output=output, examples=examples_url, progress=False, batch_size=16,
                    preprocess_batch_size=16, dtype="float32")  # the fp32 reference's dtype: `auto` is bf16 on AMX CPUs
    _, model = resolve(cfg)
    labels, protos = plain_prototypes(examples)
    assert model.head.kind == "few-shot" and list(model.head.labels) == labels
    assert np.abs(model.head.weight - protos).max() < 1e-5
    summary = run(cfg)
    assert summary.counts["images"] == n + 1 and summary.model_digest == model.digest

    rows = {r["key"]: r for r in read_table(output).to_pylist()}
    assert set(rows) == set(truth) | {"broken"} and rows["broken"]["status"] == "error"
    # Each image's label is its nearest prototype by cosine, and the score is that cosine.
    bundle = load_model("builtin:digits")
    keys = sorted(truth)
    by_key = {k: png_bytes(held[int(k[1:])][0]) for k in keys}
    with torch.no_grad():
        x = torch.from_numpy(np.stack([decode_image(by_key[k], bundle.contract)[0] for k in keys]))
        f = torch.nn.functional.normalize(bundle.model.forward_features(x).double(), dim=-1).numpy()
    sims = f @ protos.T
    for k, s in zip(keys, sims, strict=True):
        assert rows[k]["label"] == labels[int(s.argmax())], k
        assert abs(rows[k]["score"] - s.max()) < 1e-4
    accuracy = np.mean([rows[k]["label"] == truth[k] for k in keys])
    print(f"few-shot digits ({where}): {EXAMPLES_PER_LABEL} examples per digit, held-out accuracy {accuracy:.3f} "
          f"over {len(keys)}")
    assert accuracy >= 0.9  # chance is 0.1


@pytest.mark.slow
def test_examples_change_makes_shards_pending_again(ray_local, tmp_path, digits):
    train, held = digits
    write_examples(str(tmp_path / "ex"), train, per_label=3)
    write_webdataset(str(tmp_path / "in" / "s.tar"), [(f"d{i}", {"png": png_bytes(held[i][0])}) for i in range(8)])
    cfg = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), examples=str(tmp_path / "ex"),
                    progress=False)
    first = run(cfg)
    assert first.counts["images"] == 8
    _, model = resolve(cfg)
    assert plan_shards(cfg, model.digest)[1] == []  # done for this version
    # One more example for one label: a new version, so the shard is pending again.
    (tmp_path / "ex" / "3" / "extra.png").write_bytes(png_bytes(train[0][0]))
    _, changed = resolve(cfg)
    assert changed.digest != model.digest and changed.info.digest == model.info.digest
    assert len(plan_shards(cfg, changed.digest)[1]) == 1
    # The classifier of the same checkpoint is yet another version.
    _, classifier = resolve(cfg.replace(examples=""))
    assert len({classifier.digest, model.digest, changed.digest}) == 3


def test_few_shot_math():
    feats = np.array([[1, 0], [3, 0], [0, 2], [0, 1]], np.float32)
    head = heads.few_shot(["a", "b"], feats, ["a", "a", "b", "b"])
    assert np.allclose(head.weight, [[1, 0], [0, 1]])
    scores = head.scores(torch.tensor([[2.0, 2.0], [0.0, -1.0]]), head.to(torch.device("cpu")))
    assert torch.allclose(scores, torch.tensor([[0.7071068, 0.7071068], [0.0, -1.0]]))
    with pytest.raises(ModelError, match="at least one decodable image for label 'c'"):
        heads.few_shot(["a", "c"], feats, ["a", "a", "b", "b"])


def test_zero_shot_math_averages_prompts():
    def embed(texts):  # a fake text tower: one fixed vector per text
        table = {"a photo of a cat": [1, 0, 0], "a cat": [0, 1, 0], "a photo of a dog": [0, 0, 1],
                 "a dog": [0, 0, 1]}
        return np.array([table[t] for t in texts], np.float32), 10.0, -5.0

    head = heads.zero_shot(["cat", "dog"], ["a photo of a {}", "a {}"], embed)
    assert np.allclose(head.weight, [[0.7071068, 0.7071068, 0], [0, 0, 1]])
    s = head.scores(torch.tensor([[1.0, 1.0, 0.0]]), head.to(torch.device("cpu")))
    assert torch.allclose(s, torch.sigmoid(torch.tensor([[10.0 - 5.0, -5.0]])))
    with pytest.raises(ModelError, match="template with"):
        heads.zero_shot(["cat"], ["no placeholder"], embed)


def test_vocabulary(tmp_path):
    assert vocabulary(JobConfig(labels=" cat, dog ,red car,")) == ["cat", "dog", "red car"]
    (tmp_path / "v.txt").write_text("cat\n\ndog\n")
    assert vocabulary(JobConfig(labels_file=str(tmp_path / "v.txt"))) == ["cat", "dog"]
    with pytest.raises(ConfigError, match="distinct"):
        vocabulary(JobConfig(labels="cat,cat"))
    with pytest.raises(ConfigError, match="readable"):
        vocabulary(JobConfig(labels_file=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="not both"):
        JobConfig(labels="a", examples="/x")
    with pytest.raises(ConfigError, match="prompts are for zero-shot"):
        JobConfig(prompt=("a {}",))


def test_zero_shot_needs_a_text_tower():
    with pytest.raises(ModelError, match="text tower"):
        resolve(JobConfig(input="x", output="y", labels="cat,dog"))


def test_actor_refuses_weights_that_changed_since_planning():
    digest = load_model("builtin:digits").digest
    Predictor("builtin:digits", Head("classifier", tuple(str(i) for i in range(10))), digest)
    with pytest.raises(ModelError, match="changed during the run"):
        Predictor("builtin:digits", Head("classifier", tuple(str(i) for i in range(10))), "sha256:" + "0" * 64)
