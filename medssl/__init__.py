"""medssl: self-supervised pretraining on medical scans, and benchmarks of the weights it makes."""

__version__ = "0.1.0"
