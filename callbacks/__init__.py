"""PruneRL's Lightning callbacks. Hydra instantiates them from ``conf/callbacks``; ``prunerl``
never imports this package."""
