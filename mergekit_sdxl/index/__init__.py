"""Model index: checkpoints and adapters by sha256, AutoV2, AutoV3 and legacy hash (SQLite)."""
