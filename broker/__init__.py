"""Mosquitto configurations for each place (dev, site, cloud), their generation, and the launcher."""
