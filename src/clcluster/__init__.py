"""CL-Clustering: unsupervised 2D classification of cryo-EM particles by contrastive learning."""

__version__ = "0.1.0"
