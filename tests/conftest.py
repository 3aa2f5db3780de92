"""Shared fixtures: tiny timm models (pretrained=False) and one local Ray for the session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Tiny configurations of each supported family: (timm name, create_model kwargs).
TINY = {
    "vit": ("vit_small_patch16_224", dict(img_size=32, embed_dim=32, depth=4, num_heads=2)),
    "dinov2_reg": (
        "vit_small_patch14_reg4_dinov2.lvd142m",
        dict(img_size=28, embed_dim=32, depth=4, num_heads=2),
    ),
    "clip": (
        "vit_base_patch32_clip_224.openai",
        dict(img_size=64, embed_dim=32, depth=3, num_heads=2),
    ),
    "siglip": (
        "vit_base_patch16_siglip_224.v2_webli",
        dict(img_size=32, embed_dim=32, depth=3, num_heads=2),
    ),
    "mae": ("vit_base_patch16_224.mae", dict(img_size=32, embed_dim=32, depth=3, num_heads=2)),
    "resnet": ("resnet18", {}),
}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, small object store) shared by the tests that need it."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=300 * 1024 * 1024,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
