"""Core: configuration and its schema, named random streams, array backend, distributed ranks, metrics."""
