"""Names of the folders inside a store directory (the on-disk layout), and the
block size a new store gets."""

INDEX_DIR = "index.lmdb"
BLOCKS_DIR = "blocks"
CHECKPOINTS_DIR = "checkpoints"
DEFAULT_BLOCK_SIZE = 256
