"""kdray: knowledge-distillation research for image classifiers, from a laptop to a Ray cluster."""

__version__ = "0.1.0"
