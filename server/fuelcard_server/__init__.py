"""fuelcard: the core transaction server of a fuel card network."""

__version__ = "0.1.0"
