"""Train the bundled demo models: a small ViT, or a CIFAR ResNet-32, on scikit-learn's 8x8 handwritten digits.

    python -m jobs.train_digits                  # writes pipeline/assets/digits-vit/ (about a minute on a CPU)
    python -m jobs.train_digits --arch resnet32  # writes pipeline/assets/digits-resnet32/ (about two minutes)

The model learns from exactly what the pipeline will feed it: every training image is encoded as
PNG bytes and decoded by `pipeline.preprocess.decode_image` with the model's own contract, so there
is no train/serve skew. The held-out split (`digits_split`) is what `vitlabel demo` writes as shards.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ImageContract
from pipeline.models import load_model, resnet_cifar_ckpt
from pipeline.models.layers import fold_normalization
from pipeline.models.resnet_cifar import ResNetCifar, ResNetCifarConfig
from pipeline.models.vit import ViT, ViTConfig
from pipeline.models.vit_ckpt import save_checkpoint
from pipeline.preprocess import decode_image

log = logging.getLogger(__name__)

IMAGE_SIDE = 32  # 8x8 digits upscaled 4x with nearest: each 8x8 patch covers 2x2 source pixels
CONTRACT = ImageContract(image_size=(IMAGE_SIDE, IMAGE_SIDE), patch_size=8)  # squash, bilinear, mean = std = 0.5
CONFIG = ViTConfig(image_size=CONTRACT.image_size, patch_size=CONTRACT.patch_size, dim=64, depth=4, heads=4,
                   mlp_dim=128, num_classes=10)
LABELS = tuple(str(i) for i in range(10))
ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets"
DEFAULT_OUT = ASSETS / "digits-vit"
# The ResNet eats the same 32x32 images as pixels, normalised with its family's default (CIFAR-10) mean/std.
RESNET_CONTRACT = ImageContract(image_size=(IMAGE_SIDE, IMAGE_SIDE), mean=resnet_cifar_ckpt.CIFAR10_MEAN,
                                std=resnet_cifar_ckpt.CIFAR10_STD)
RESNET_CONFIG = ResNetCifarConfig(depths=(5, 5, 5), widths=(16, 32, 64), shortcut="A", num_classes=10)  # ResNet-32
# Per-architecture defaults: --arch picks the model, the output directory and the training schedule.
# The ResNet trains on one thread: faster than two on a shared 2-core machine, and bit-reproducible (CPU conv
# kernels split their sums by thread count). Held-out top-1 0.9933 in about two minutes.
ARCHS = {
    "vit": {"out": DEFAULT_OUT, "epochs": 15, "batch_size": 256, "variants": 16, "lr": 2e-3, "threads": 0},
    "resnet32": {"out": ASSETS / "digits-resnet32", "epochs": 3, "batch_size": 64, "variants": 3, "lr": 0.1,
                 "threads": 1},
}


def digit_image(pixels8: np.ndarray) -> Image.Image:
    """An 8x8 digit (values 0..16) -> 32x32 8-bit grayscale PIL image (nearest upscale)."""
    grey = np.clip(np.round(pixels8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [8, 8]
    return Image.fromarray(grey, "L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.NEAREST)


def _load_split(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    return train_test_split(d.images, d.target, test_size=test_fraction, random_state=seed, stratify=d.target)


def digits_split(seed: int = 0, test_fraction: float = 0.25
                 ) -> tuple[list[tuple[Image.Image, int]], list[tuple[Image.Image, int]]]:
    """(train, held_out) lists of (image, label): a fixed, stratified split of load_digits."""
    x_train, x_held, y_train, y_held = _load_split(seed, test_fraction)
    return ([(digit_image(a), int(y)) for a, y in zip(x_train, y_train, strict=True)],
            [(digit_image(a), int(y)) for a, y in zip(x_held, y_held, strict=True)])


def pipeline_tokens(img: Image.Image, contract: ImageContract = CONTRACT) -> np.ndarray:
    """PNG bytes -> decode_image with the model's contract: the serving path, byte for byte."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    tokens, _, _ = decode_image(buf.getvalue(), contract)
    return tokens  # [N, P*P*3] (ViT) or [H, W, 3] (ResNet) uint8


def augment(pixels8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small random rotation, scale and shift of an 8x8 digit, kept on its 0..16 integer grid so the
    result still looks like a load_digits image once upscaled."""
    from scipy.ndimage import affine_transform

    theta, scale, shift = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.9, 1.1), rng.uniform(-1, 1, 2)
    m = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) / scale  # out -> in
    centre = np.array([3.5, 3.5])
    out = affine_transform(pixels8, m, offset=centre - m @ centre + shift, order=1, mode="constant")
    return np.clip(np.round(out), 0, 16)  # [8, 8]


def encode(arrays: list[np.ndarray], contract: ImageContract = CONTRACT) -> torch.Tensor:
    return torch.from_numpy(np.stack([pipeline_tokens(digit_image(a), contract) for a in arrays]))  # [M, ...] uint8


def normalise(tokens: torch.Tensor) -> torch.Tensor:
    """What the folded patch projection computes implicitly; training runs on the unfolded form."""
    c = CONTRACT
    mean = torch.tensor(c.mean).repeat(c.patch_size * c.patch_size)  # [P*P*3]; channel varies fastest
    std = torch.tensor(c.std).repeat(c.patch_size * c.patch_size)
    return (tokens.float() / 255.0 - mean) / std  # [B, N, P*P*3]


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    pred = torch.cat([model(tokens[i:i + 512]).argmax(-1) for i in range(0, len(tokens), 512)])
    return (pred == labels).float().mean().item()


def _training_set(seed: int, variants: int, contract: ImageContract) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training digit once as is plus `variants - 1` augmented copies, all through PNG + decode_image."""
    x_train, _, y_train, _ = _load_split(0, 0.25)  # the split digits_split() fixes; --seed only drives training
    rng = np.random.default_rng(seed)
    arrays = [a if k == 0 else augment(a, rng) for a in x_train for k in range(variants)]
    return encode(arrays, contract), torch.from_numpy(np.repeat(y_train, variants))  # [M, ...] uint8, [M]


def _fit(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
         batch_size: int, seed: int, label_smoothing: float) -> None:
    """Minibatch training with a linear warm-up over the first epoch, then cosine decay to zero."""
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        seen, loss_sum = 0, 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen, loss_sum = seen + len(idx), loss_sum + loss.item() * len(idx)
        log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, loss_sum / seen)
    model.eval()


def train(epochs: int, batch_size: int, lr: float, seed: int, variants: int) -> ViT:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    tokens, y = _training_set(seed, variants, CONTRACT)  # [M, N, P*P*3] uint8, [M]
    x = normalise(tokens)  # [M, N, P*P*3]
    log.info("training on %d images (%d variants per digit), config %s", len(x), variants, CONFIG)
    model = ViT(CONFIG)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}], lr=lr)
    _fit(model, opt, x, y, epochs, batch_size, seed, label_smoothing=0.1)
    # Fold the normalisation into the patch projection: from here on the model eats raw uint8 tokens.
    with torch.no_grad():
        w, b = fold_normalization(model.patch_embed.weight, model.patch_embed.bias, CONTRACT.mean, CONTRACT.std)
        model.patch_embed.weight.copy_(w)
        model.patch_embed.bias.copy_(b)
    return model


def train_resnet(epochs: int, batch_size: int, lr: float, seed: int, variants: int) -> ResNetCifar:
    """ResNet-32 on uint8 pixels (it normalises inside): SGD with Nesterov momentum, weight decay on conv and
    linear weights only (the paper's recipe, on a much shorter schedule)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    x, y = _training_set(seed, variants, RESNET_CONTRACT)  # [M, H, W, 3] uint8, [M]
    log.info("training on %d images (%d variants per digit), config %s", len(x), variants, RESNET_CONFIG)
    model = ResNetCifar(RESNET_CONFIG, RESNET_CONTRACT.mean, RESNET_CONTRACT.std)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": other, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    _fit(model, opt, x, y, epochs, batch_size, seed, label_smoothing=0.0)
    return model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(ARCHS), default="vit", help="the model to train (default: %(default)s)")
    p.add_argument("--out", help="checkpoint directory (default: the architecture's bundled asset)")
    p.add_argument("--epochs", type=int, help="default: vit 15, resnet32 3")
    p.add_argument("--batch-size", type=int, help="default: vit 256, resnet32 64")
    p.add_argument("--variants", type=int, help="copies of each training digit (1 original + augmented); "
                   "default: vit 16, resnet32 3")
    p.add_argument("--lr", type=float, help="peak learning rate; default: vit 2e-3 (AdamW), resnet32 0.1 (SGD)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.97, help="fail (exit 1) below this held-out top-1")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default); default: vit 0, resnet32 1")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, default in ARCHS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.arch == "vit":
        contract = CONTRACT
        model = train(args.epochs, args.batch_size, args.lr, args.seed, args.variants)
        digest = save_checkpoint(model, contract, LABELS, str(args.out), name="digits-vit")
    else:
        contract = RESNET_CONTRACT
        model = train_resnet(args.epochs, args.batch_size, args.lr, args.seed, args.variants)
        digest = resnet_cifar_ckpt.save_checkpoint(model, contract, LABELS, str(args.out), name="digits-resnet32")
    # Score the saved artifact, reloaded, on held-out PNGs through decode_image: the serving path.
    _, held = digits_split()
    x = torch.from_numpy(np.stack([pipeline_tokens(img, contract) for img, _ in held]))  # [M, ...] uint8
    y = torch.tensor([label for _, label in held])
    acc = accuracy(load_model(str(args.out)).model, x, y)
    log.info("saved %s (%s) in %.1fs; held-out top-1 accuracy %.4f on %d images", args.out, digest[:19],
             time.perf_counter() - t0, acc, len(y))
    if acc < args.min_accuracy:
        log.error("held-out accuracy %.4f is below --min-accuracy %.2f", acc, args.min_accuracy)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
