"""ccus-touch edge agent: the runtime every device role shares (reader, ID list, decision, outbox, MQTT link)."""

__version__ = "0.1.0"
