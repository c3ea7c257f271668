"""zipper: speech-text pipelines built on the Zipper multi-tower decoder (arXiv 2405.18669)."""

__version__ = "0.1.0"
