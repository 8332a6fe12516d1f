"""Adapter training and demo building. This package may use the engine; `adapters/` never does."""
