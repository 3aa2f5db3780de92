"""Pretraining core: contrastive losses, class-balanced sampling and cross-worker gathering."""
