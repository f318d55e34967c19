"""The sink's ingest: MQTT in, store rows out, PUBACK after the commit.

One job a module: receiver (the MQTT side: paho, the shared subscription, manual PUBACKs after
the writer's commit), writer (the writer process: batches, store writes, isolation, the ack
ledger), pipe (the framing on the socketpair between the two), fastpath (payload -> store row
without a Touch). docs/sink.md describes the whole.
"""

from cloud_sink.ingest.receiver import PIPELINE, Sink, TlsFiles

__all__ = ["PIPELINE", "Sink", "TlsFiles"]
