"""Datasets of the multimodal VAE application (see ``core``)."""

from .core import (
    DATASETS,
    LayoutError,
    Modality,
    MultimodalDataset,
    PolyMNIST,
    cached_tensors,
    decode_images,
    detect_layout,
    modality_mask,
    open_dataset,
    polymnist_modalities,
    read_png_tree,
    read_tensor_files,
    reconstruction_weights,
    store_decoded_png_tree,
)

__all__ = ["DATASETS", "LayoutError", "Modality", "MultimodalDataset", "PolyMNIST", "cached_tensors", "decode_images",
           "detect_layout", "modality_mask", "open_dataset", "polymnist_modalities", "read_png_tree",
           "read_tensor_files", "reconstruction_weights", "store_decoded_png_tree"]
