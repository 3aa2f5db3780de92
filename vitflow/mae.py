"""MAE reconstruction loss: how well a masked autoencoder "understands" an image (issue 13).

timm ships MAE encoders (``vit_*_patch16_224.mae``) without their decoders. This module adds
the decoder of the official MAE code (He et al., 2022), with the official checkpoints' key
names, so one state dict loads the timm encoder and this decoder side by side:

- ``decoder_embed`` (encoder width -> decoder width), ``mask_token``, ``decoder_pos_embed``
  (``1 x (1 + patches) x width``, cls slot first), ``decoder_blocks.*`` (timm ``Block``s,
  the same layout the official code built them from), ``decoder_norm``, ``decoder_pred``
  (width -> ``patch * patch * 3`` pixels).

:func:`mae_loss` is the paper's objective per image: encode a random 25% of the patches
(mask ratio 0.75; the noise that picks them is seeded per image, so an image's mask does
not depend on its batch), decode all of them, and take the mean squared error over the
*masked* patches against the image's patches, each normalised by its own mean and variance
when the checkpoint was trained that way (``norm_pix_loss``, the paper's default; the
official "visualize" checkpoints were trained without it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
DECODER_KEYS = ("mask_token", "decoder_pos_embed")


class MAEDecoder(nn.Module):
    """The MAE decoder, with the official checkpoints' parameter names.

    Args:
        num_patches: patches per image (196 for 224 px at patch 16).
        patch_size: the encoder's patch size.
        encoder_dim: the encoder's width.
        decoder_dim, depth, num_heads, mlp_ratio: the decoder's shape (the paper's 512, 8,
            16, 4 by default).
    """

    def __init__(
        self,
        num_patches: int,
        patch_size: int,
        encoder_dim: int,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
            for _ in range(depth)
        )
        self.decoder_norm = _layer_norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans, bias=True)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], patch_size: int, num_heads: int = 16
    ) -> MAEDecoder:
        """Build the decoder from a checkpoint's decoder keys (other keys are ignored). The
        shapes give every size but the head count, which the official models all set to 16.
        """
        missing = [k for k in ("decoder_embed.weight", "decoder_pos_embed") if k not in state]
        if missing:
            raise ValueError(
                f"the checkpoint has no MAE decoder ({', '.join(missing)} missing): timm's "
                "MAE weights are encoder-only; use an official MAE checkpoint that includes the "
                "decoder (e.g. mae_visualize_vit_*.pth)"
            )
        decoder_dim, encoder_dim = state["decoder_embed.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
        pred = state["decoder_pred.weight"].shape[0]
        dec = cls(
            num_patches=state["decoder_pos_embed"].shape[1] - 1,
            patch_size=patch_size,
            encoder_dim=encoder_dim,
            decoder_dim=decoder_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / decoder_dim,
            in_chans=pred // patch_size**2,
        )
        dec.load_state_dict(decoder_state(state), strict=True)
        return dec

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent`` ``(B, 1 + kept, D_enc)`` (cls first), ``ids_restore`` ``(B, L)`` ->
        predicted pixels ``(B, L, patch * patch * 3)``."""
        x = self.decoder_embed(latent)
        b, kept = x.shape[0], x.shape[1] - 1
        masked = self.mask_token.expand(b, ids_restore.shape[1] - kept, -1)
        tokens = torch.cat([x[:, 1:], masked], dim=1)
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
        tokens = torch.gather(tokens, 1, index)  # back to the patches' own order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def _layer_norm(dim: int, **kw) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kw)


def decoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's keys of an official MAE checkpoint."""
    return {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES) or k in DECODER_KEYS}


def encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything else: the encoder's keys, which timm's ViT loads as they are."""
    dec = decoder_state(state)
    return {k: v for k, v in state.items() if k not in dec}


def mask_noise(ids: Sequence[str], num_patches: int, seed: int) -> torch.Tensor:
    """``(B, L)`` uniform noise that picks each image's kept patches: a pure function of
    ``(seed, image id)``, so a mask does not depend on the batch the image came in."""
    rows = []
    for image_id in ids:
        digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        rows.append(torch.rand(num_patches, generator=gen))
    return torch.stack(rows)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, patch * patch * C)``, patches row by row, pixels inside
    a patch row by row with channels last (the official code's order, which
    ``decoder_pred`` was trained to emit)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("bcyixj->byxijc", x).reshape(b, (h // patch) * (w // patch), -1)


@torch.no_grad()
def mae_loss(
    encoder: nn.Module,
    decoder: MAEDecoder,
    images: torch.Tensor,
    noise: torch.Tensor,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
) -> torch.Tensor:
    """Per-image MAE loss ``(B,)``: the mean squared error over the masked patches.

    Args:
        encoder: a timm ``VisionTransformer`` laid out as MAE's (a class token, position
            embeddings that include its slot, no register tokens).
        decoder: :class:`MAEDecoder`.
        images: ``(B, 3, H, W)``, normalised as the model expects.
        noise: ``(B, L)`` from :func:`mask_noise`: the lowest ``(1 - mask_ratio) * L`` are
            kept.
        mask_ratio: the share of patches hidden from the encoder.
        norm_pix_loss: targets are each patch normalised by its own mean and variance.
    """
    check_encoder(encoder)
    x = encoder.patch_embed(images)
    b, length, dim = x.shape
    x = x + encoder.pos_embed[:, 1:, :]
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(b, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # 1 where hidden, in the patches' own order
    cls = (encoder.cls_token + encoder.pos_embed[:, :1, :]).expand(b, -1, -1)
    h = encoder.norm_pre(torch.cat([cls, kept], dim=1))
    for blk in encoder.blocks:
        h = blk(h)
    pred = decoder(encoder.norm(h), ids_restore)
    target = patchify(images, decoder.patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)


def check_encoder(encoder: nn.Module) -> None:
    cls = getattr(encoder, "cls_token", None)
    pos = getattr(encoder, "pos_embed", None)
    prefix = getattr(encoder, "num_prefix_tokens", None)
    if cls is None or pos is None or prefix != 1 or getattr(encoder, "no_embed_class", False):
        raise ValueError(
            "the MAE loss needs a ViT laid out as MAE's: one class token and position "
            "embeddings that include its slot (timm's vit_*_patch16_224.mae models)"
        )
