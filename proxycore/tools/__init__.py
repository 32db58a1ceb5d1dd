"""Tools beside the runtime: load generator, histogram, simulator, demo.

No runtime module imports this package."""
