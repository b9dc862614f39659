"""Neural networks of the engine and the loading of their published checkpoints."""
