"""vembed: turn a pretrained vision backbone into a domain-specific image embedding model."""

__version__ = "0.1.0"
