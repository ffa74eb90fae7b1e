"""The micro world: procedural scenes, a judge that reads them, and a tiny base model trained on them."""
