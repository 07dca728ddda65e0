"""Names of the folders inside a store directory (the on-disk layout)."""

INDEX_DIR = "index.lmdb"
BLOCKS_DIR = "blocks"
CHECKPOINTS_DIR = "checkpoints"
