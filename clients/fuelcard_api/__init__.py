"""The JSON API for apps and mini-programs (fuelcard-api)."""
