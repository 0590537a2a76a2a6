"""lensgraph's version, in a module of its own so that reading it runs nothing else."""

__version__ = "0.1.0"
