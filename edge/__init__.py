"""ccus-touch edge agent: the runtime every device role shares (readers, ID list, decision, MQTT)."""

__version__ = "0.1.0"
