"""Custom operations: oneDNN convolutions for XLA CPU (`onednn`)."""
