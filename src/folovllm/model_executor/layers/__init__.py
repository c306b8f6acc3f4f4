"""Building blocks of a decoder layer, written for a flattened ``[T, ...]`` token batch."""
