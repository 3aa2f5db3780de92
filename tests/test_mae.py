"""The MAE decoder and loss (vitflow.mae) against a loss written out by hand, patch by patch."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from vitflow.mae import MAEDecoder, encoder_state, mae_loss, mask_noise

PATCH, SIDE = 8, 32
L = (SIDE // PATCH) ** 2


def tiny_encoder():
    """timm's MAE encoder layout at toy size (random init)."""
    return timm.create_model(
        "vit_base_patch16_224.mae",
        pretrained=False,
        img_size=SIDE,
        patch_size=PATCH,
        embed_dim=32,
        depth=2,
        num_heads=2,
    ).eval()


@pytest.fixture(scope="module")
def tiny_mae():
    torch.manual_seed(0)
    enc = tiny_encoder()
    dec = MAEDecoder(L, PATCH, encoder_dim=32, decoder_dim=16, depth=2, num_heads=2).eval()
    with torch.no_grad():  # random everywhere, so a slot mixed up anywhere shows
        for p in (*enc.parameters(), *dec.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
    return enc, dec


def hand_loss(enc, dec, img: torch.Tensor, noise: torch.Tensor, ratio: float, norm: bool):
    """One image: keep the lowest-noise patches, encode them, place every patch's token or
    the mask token at its own position, decode, and average the squared error of the hidden
    patches against their pixels (each patch normalised by its own mean and variance)."""
    with torch.no_grad():
        tokens = enc.patch_embed(img[None])[0] + enc.pos_embed[0, 1:]
        order = [int(i) for i in np.argsort(noise.numpy(), kind="stable")]
        keep = order[: int(L * (1 - ratio))]
        seq = torch.cat([(enc.cls_token + enc.pos_embed[:, :1])[0], tokens[keep]])[None]
        for blk in enc.blocks:
            seq = blk(seq)
        latent = dec.decoder_embed(enc.norm(seq))[0]
        full = [latent[0]]
        for j in range(L):
            full.append(latent[1 + keep.index(j)] if j in keep else dec.mask_token[0, 0])
        x = torch.stack(full)[None] + dec.decoder_pos_embed
        for blk in dec.decoder_blocks:
            x = blk(x)
        pred = dec.decoder_pred(dec.decoder_norm(x))[0, 1:].numpy()
    pix = img.numpy()
    errors = []
    per_row = SIDE // PATCH
    for j in range(L):
        if j in keep:
            continue
        y, x0 = divmod(j, per_row)
        block = pix[:, y * PATCH : (y + 1) * PATCH, x0 * PATCH : (x0 + 1) * PATCH]
        target = block.transpose(1, 2, 0).reshape(-1).astype(np.float64)  # rows, cols, RGB
        if norm:
            target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
        errors.append(np.mean((pred[j] - target) ** 2))
    return float(np.mean(errors))


@pytest.mark.parametrize("norm", [True, False], ids=["norm_pix", "raw_pix"])
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_mae_loss_equals_the_loss_written_out_by_hand(tiny_mae, norm, ratio):
    enc, dec = tiny_mae
    images = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(4))
    noise = mask_noise(["a", "b", "c"], L, seed=0)
    got = mae_loss(enc, dec, images, noise, mask_ratio=ratio, norm_pix_loss=norm)
    want = [hand_loss(enc, dec, images[i], noise[i], ratio, norm) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)


def test_an_images_mask_and_loss_do_not_depend_on_its_batch(tiny_mae):
    enc, dec = tiny_mae
    images = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    ids = ["x/1.jpg", "x/2.jpg", "x/3.jpg"]
    together = mae_loss(enc, dec, images, mask_noise(ids, L, seed=7))
    alone = mae_loss(enc, dec, images[1:2], mask_noise(ids[1:2], L, seed=7))
    torch.testing.assert_close(together[1:2], alone)
    assert not torch.equal(mask_noise(ids, L, seed=7), mask_noise(ids, L, seed=8))


def test_one_official_layout_checkpoint_loads_encoder_and_decoder(tiny_mae):
    """Encoder and decoder keys in one state dict, as the official checkpoints hold them."""
    enc, dec = tiny_mae
    state = {**enc.state_dict(), **dec.state_dict()}
    assert "decoder_blocks.1.attn.qkv.weight" in state and "mask_token" in state
    dec2 = MAEDecoder.from_state_dict(state, patch_size=PATCH, num_heads=2).eval()
    enc2 = tiny_encoder()
    enc2.load_state_dict(encoder_state(state), strict=True)
    images = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(6))
    noise = mask_noise(["a", "b"], L, seed=0)
    torch.testing.assert_close(
        mae_loss(enc2, dec2, images, noise), mae_loss(enc, dec, images, noise)
    )


def test_an_encoder_only_checkpoint_is_refused_with_the_fix(tiny_mae):
    enc, _ = tiny_mae
    with pytest.raises(ValueError, match="no MAE decoder.*decoder"):
        MAEDecoder.from_state_dict(enc.state_dict(), patch_size=PATCH)
