"""clip-dfkd: data-free distillation of CLIP into small classifiers via prompt diversification."""

__version__ = "0.1.0"
