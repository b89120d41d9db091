"""Contrastive learning: augmentation, encoders, the loss, training batches over shards."""
