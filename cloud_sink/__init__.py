"""The cloud sink: validates touches from MQTT, stores them idempotently, derives work history."""
