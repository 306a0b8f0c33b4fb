"""Recipes: end-to-end jobs built from the library (quickstart; later learning curves, comparisons)."""
