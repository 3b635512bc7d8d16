"""The multimodal VAE application: HELVAE, MoHELVAE and the systems they are compared with, on opinionpool's
aggregators (``python -m applications.multimodal_vae --help``)."""

__all__ = ["config", "data", "evaluation", "files", "models", "networks", "objectives", "study", "sweep", "train"]
