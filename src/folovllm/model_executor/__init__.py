"""The model side of the engine: layers, model classes and the weight loader."""
