"""The plugin's version (its own module, so that code below the package's entry point can read it)."""

__version__ = "0.1.0"
