"""Graph capture and the pass pipeline (ATen-level FX graphs; see README.md beside this file)."""
