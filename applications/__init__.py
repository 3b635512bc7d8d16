"""Applications built on opinionpool."""

__all__ = ["multimodal_vae"]
