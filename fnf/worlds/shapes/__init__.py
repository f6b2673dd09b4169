"""The embedded "shapes world": a procedural image generator and an analytic ground-truth judge."""
