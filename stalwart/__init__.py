"""stalwart: fault-tolerant distributed training for PyTorch on Ray."""

__version__ = "0.1.0"
