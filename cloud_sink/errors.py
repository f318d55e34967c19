"""The error base of cloud_sink/: `except SinkError` catches anything the sink raises on purpose.

StoreUnavailable (stores/postgres.py) and CsvError (courses.py) derive from it and keep their
older bases. Imports nothing.
"""


class SinkError(Exception):
    """Anything the sink raises on purpose (a store it cannot reach, an import file it refuses)."""
