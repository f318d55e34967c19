"""The error base of ops/: `except OpsError` catches anything an operator's tool raises on purpose.

PkiError (ops/pki.py), MqttError (ops/mqttc.py) and PublishError (ops/mqttc.py) derive
from it and keep their older bases. Imports nothing.
"""


class OpsError(Exception):
    """Anything the operator's tools raise on purpose (PKI, MQTT, list publishing)."""
