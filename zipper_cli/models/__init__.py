"""Model code: the decoder-only Tower (text and speech towers share it)."""

from zipper_cli.models.tower import PRESETS, Block, Tower, TowerConfig, tower_preset

__all__ = ["PRESETS", "Block", "Tower", "TowerConfig", "tower_preset"]
