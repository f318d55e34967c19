"""The operator's console: fleet, live touches and the reports in a browser (docs/console.md).

Reads only: the store through cloud_sink.store (the interface `ccus report` uses) and the
retained state and touch topics over MQTT. Imports cloud_sink, ops and protocol; nothing of
ours imports it but ccus/cli.py, lazily.
"""


class ConsoleError(Exception):
    """An expected fault the console reports in one line (bad users file, bad option)."""
