"""The loraswarm peer daemon: config, CLI, model and data loading, training, persistence."""
