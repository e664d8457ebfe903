"""synco: self-supervised vision transformers with synthetic hard negatives (SynCo-v2 / SynBY / Syn2Co)."""

__version__ = "0.1.0"
