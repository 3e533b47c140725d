"""The tiny twin of TinyGPT-V: locally made backbones (backbones.py) and the embedded default recipe (recipe.py)."""
