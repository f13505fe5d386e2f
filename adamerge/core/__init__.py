"""The merge core: experts -> task vectors (pool), merged models over a coefficient table (dense, low-rank, LoRA-native), export."""
