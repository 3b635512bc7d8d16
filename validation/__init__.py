"""Validation of opinionpool against independent references (run with ``python -m validation``)."""

__all__ = ["closed_forms", "paper", "reference", "report"]
