"""How far the fast decode paths land from the exact one (timm's eval transform on PIL).

Same photo-like JPEGs as ``decode_speed.py`` (quality 90), each decoded and resized/cropped
to a ViT-S/16's 224x224 input by every path, and compared with the exact path
(``decode_image`` + ``Preprocessor.resize_crop``):

  pil draft        - decode_image(draft_size=pre.draft_size): libjpeg's DCT-domain scaling
  pil draft x2     - the same, never below twice that size (less scaling, less deviation)
  device path      - vitflow.gpu_decode.decode_resize_batch on the CPU: torchvision's
                     decode_jpeg (libjpeg-turbo here, nvJPEG on a GPU) + torch resize
  tv decode only   - torchvision decode_jpeg + the exact PIL resize: the decoder's share
  torch resize only- PIL decode + Preprocessor.resize_crop_tensor: the resampler's share
  simplejpeg/n     - simplejpeg with min_width/min_height (if installed), + PIL resize

Per path: mean absolute pixel difference (0..255), the largest single difference, PSNR (dB)
of the 224x224x3 input, and the cosine similarity of the embeddings (pre-logits) of a
random-init vit_small_patch16_224 (seed 0, the same weights for every path). For scale, the
last line gives the cosine between the exact embeddings of *different* images. On a GPU,
nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's: run with ``--device cuda``
there to measure the device path as it runs in a job.

Run:  .venv/bin/python benchmarks/decode_deviation.py [--sizes 1280x960 4032x3024] [--count 12]
"""

from __future__ import annotations

import argparse

import numpy as np
import timm
import torch
from decode_speed import VIT_S16, photo_jpegs  # same folder
from machine import describe
from PIL import Image

from vitflow.decode import decode_image
from vitflow.gpu_decode import decode_resize_batch
from vitflow.preprocess import Preprocessor


def fast_paths(pre: Preprocessor, device: str):
    """name -> (list of JPEG bytes -> uint8 (N, 224, 224, 3) numpy)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def stack(arrs):
        return np.stack([np.asarray(a) for a in arrs])

    def tv_decode(d):
        return decode_jpeg(
            torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB
        )

    twice = tuple(2 * v for v in pre.draft_size)
    out = {
        "pil draft": lambda ds: stack(
            pre.resize_crop(decode_image(d, draft_size=pre.draft_size)) for d in ds
        ),
        "pil draft x2": lambda ds: stack(
            pre.resize_crop(decode_image(d, draft_size=twice)) for d in ds
        ),
        "device path": lambda ds: decode_resize_batch(ds, pre, device).pixels.cpu().numpy(),
        "tv decode only": lambda ds: stack(
            pre.resize_crop(Image.fromarray(tv_decode(d).permute(1, 2, 0).numpy())) for d in ds
        ),
        "torch resize only": lambda ds: stack(
            pre.resize_crop_tensor(
                torch.from_numpy(np.array(decode_image(d))).permute(2, 0, 1)[None]
            )[0].numpy()
            for d in ds
        ),
    }
    try:
        import simplejpeg
    except ImportError:
        return out
    w, h = pre.draft_size
    out["simplejpeg/n"] = lambda ds: stack(
        pre.resize_crop(Image.fromarray(simplejpeg.decode_jpeg(d, min_width=w, min_height=h)))
        for d in ds
    )
    return out


def embed(model, pre: Preprocessor, pixels: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        feats = model.forward_head(model.forward_features(pre.to_tensor(pixels)), pre_logits=True)
    return torch.nn.functional.normalize(feats.float(), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1280x960", "4032x3024"])
    parser.add_argument("--count", type=int, default=12, help="images per size")
    parser.add_argument("--device", default="cpu", help="device of the device path")
    a = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    pre = Preprocessor(VIT_S16)
    print(f"machine: {describe(gpu_used=a.device != 'cpu')}")
    print("model: vit_small_patch16_224, random init (seed 0); input 224, bicubic, crop_pct 0.9\n")
    head = f"{'size':<10}{'path':<19}{'MAD':>7}{'max':>5}{'PSNR dB':>9}{'min':>7}"
    head += f"{'cosine':>11}{'min':>11}"
    print(head)
    for spec in a.sizes:
        w, h = (int(v) for v in spec.split("x"))
        count = a.count if w * h <= 2_000_000 else max(a.count // 3, 3)
        datas = photo_jpegs((w, h), count, seed=1000)
        exact = np.stack([pre.resize_crop(decode_image(d)) for d in datas])
        ref = embed(model, pre, exact)
        for name, fn in fast_paths(pre, a.device).items():
            got = fn(datas)
            diff = np.abs(got.astype(np.int16) - exact.astype(np.int16))
            mse = (diff.astype(np.float64) ** 2).reshape(len(datas), -1).mean(axis=1)
            with np.errstate(divide="ignore"):
                psnr = 10 * np.log10(255.0**2 / mse)  # inf where identical
            cos = (embed(model, pre, got) * ref).sum(dim=1)
            print(
                f"{spec:<10}{name:<19}{diff.mean():>7.3f}{diff.max():>5d}{psnr.mean():>9.1f}"
                f"{psnr.min():>7.1f}{cos.mean().item():>11.7f}{cos.min().item():>11.7f}"
            )
        pairs = (ref @ ref.T)[~torch.eye(len(datas), dtype=torch.bool)]
        print(
            f"{spec:<10}{'(different images)':<19}{'':>28}{pairs.mean().item():>11.7f}"
            f"{pairs.min().item():>11.7f}"
        )


if __name__ == "__main__":
    main()
