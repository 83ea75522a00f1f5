"""esft-lightning: Expert-Specialized Fine-Tuning of Mixture-of-Experts LLMs with PyTorch Lightning."""

from .data import ESFTDataModule, Source
from .module import ESFTModule

__all__ = ["ESFTModule", "ESFTDataModule", "Source"]
__version__ = "0.1.0"
