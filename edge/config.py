"""Agent configuration: TOML in, typed dataclasses out. Every key has a default or a clear error.

Errors name the key as it is written in the file (`readers[1].direction`), so an operator on a
site can fix the file without reading code.
"""

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import EdgeError
from protocol.touch import DEVICE_ID, MAX_SEQ, SITE_ID, Role, fact_text_ok


class ConfigError(EdgeError, ValueError):
    """A config file that cannot be used; the message names the key."""


@dataclass
class DeviceConfig:
    id: str
    site: str
    role: str = "gate"
    data_dir: str = "/var/lib/ccus-touch"


@dataclass
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 8883
    tls: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 30
    inflight: int = 50            # unacknowledged QoS 1 publishes at most (paho stalls past 65,535)
    state_interval_s: float = 60.0
    # delivery timing (docs/delivery.md): replay what the sink has not acknowledged after
    # ack_timeout_s, doubling up to ack_timeout_max_s while nothing moves; reconnect after
    # reconnect_min_s doubling to reconnect_max_s, but within reconnect_fast_max_s while the
    # broker's host refuses TCP (a broker restarting), so devices are back soon after it is
    ack_timeout_s: float = 30.0
    ack_timeout_max_s: float = 600.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    reconnect_fast_max_s: float = 3.0
    # MQTT version: "5", or "3.1.1" for a broker that speaks only that (a NATS node's MQTT
    # gateway); 3.1.1 has no reason codes: only the end-to-end acknowledgement says a touch
    # arrived (docs/delivery.md, "MQTT 3.1.1")
    protocol: str = "5"
    # "HOST:PORT" of each broker (the nodes of a cluster): tried in turn, the next one after
    # every failed or lost connection; empty: host and port alone
    brokers: list[str] = field(default_factory=list)
    # the QoS the link subscribes with (acks, config, lists); 0 on a NATS node, where a QoS 1
    # subscription is a replicated JetStream consumer per device (the sink's acks reach an
    # MQTT subscriber as QoS 0 anyway); what it loses is sent again (retained, or a replay)
    subscribe_qos: int = 1

    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of every broker to try, in order (`brokers`, or host and port)."""
        if not self.brokers:
            return [(self.host, self.port)]
        return [parse_broker(b, f"mqtt.brokers[{i}]") for i, b in enumerate(self.brokers)]


PROTOCOLS = ("5", "3.1.1")


@dataclass
class IdListConfig:
    name: str = ""                # signed list to follow over MQTT (ccus/v1/list/{name}/...)
    path: str = ""                # a static list (.idl, or .csv for small sites); empty: none
    max_age_h: float = 48.0       # older than this is a reported condition
    max_issued_age_days: float = 30.0  # a list issued longer ago is refused unless forced


@dataclass
class ReaderConfig:
    name: str
    # nfcpy: usb:054c:06c3, tty:USB0:pn532, udp:127.0.0.1:50001;
    # pcsc: pcsc: (first reader) or pcsc:NAME (first reader whose name contains NAME)
    path: str
    backend: str = "nfcpy"        # nfcpy | pcsc
    direction: str = "in"         # gate readers: "in" (entry) or "out" (exit)
    targets: list[str] = field(default_factory=lambda: ["212F", "106A", "106B"])
    profile: str = "uid"          # name of a [profiles.X] table, or "uid" (identifier mapping)
    retap_window_s: float = 2.0   # the same card again within this is the same tap
    feedback: str = "reader"      # reader (LED/buzzer where it has one, and the hook) | hook | none


@dataclass
class ProfileConfig:
    kind: str = "uid"             # uid | felica | iso_dep
    # felica: the card must answer polling for system_code; blocks block..block+block_count-1
    # of service_code are read (without encryption) and the ID decoded from them
    system_code: int = 0x8008
    service_code: int = 0x100B
    block: int = 0
    block_count: int = 1          # 1..15
    # iso_dep (Type 4A/4B): SELECT aid, SELECT file_id (EF, skipped when empty), READ BINARY
    # read_length bytes at read_offset, then the ID is decoded from what was read
    aid: str = ""                 # hex, 5..16 bytes
    file_id: str = ""             # hex, 2 bytes, or "" for none
    read_offset: int = 0
    read_length: int = 16         # 1..255
    # the ID inside the data read (both kinds): bytes offset.., ascii (length digits) or bcd
    offset: int = 0
    length: int = 14
    encoding: str = "ascii"       # ascii | bcd


@dataclass
class ClockConfig:
    assume_synced: bool = False   # trust the system clock even without a sync flag from the OS


@dataclass
class SecurityConfig:
    max_config_age_days: float = 90.0  # a config issued longer ago is refused unless forced


@dataclass
class GateConfig:
    anti_passback: bool = False
    # the controller board that drives the gate (turnstile, flap, door strike) and reads its
    # door sensor and emergency-release input; empty: a gate with no board (taps are recorded,
    # nothing opens, no passage is confirmed)
    serial: str = ""
    baud: int = 115200
    relay_in: int = 0             # the relay an entry tap pulses (0 or 1)
    relay_out: int = 0            # the relay an exit tap pulses: 1 on a two-relay turnstile
    pulse_ms: int = 500           # relay pulse (the board caps it at 5000)
    passage_timeout_s: float = 8.0   # allowed, and no door edge within this: not_passed
    held_open_s: float = 30.0     # the door open longer than this: a held_open alarm


@dataclass
class TrainingConfig:
    schedule: str = ""            # course schedule (TOML); empty: touches carry no course


@dataclass
class VendingConfig:
    serial: str = ""              # the controller board's serial port (required for role vending)
    baud: int = 115200
    slot: int = 1                 # the slot a free drink comes from
    limit: int = 1                # free drinks per technician per period
    period: str = "day"           # day | week
    cut_hour: int = 4             # the period turns over at this hour, Asia/Tokyo
    scope: str = "machine"        # machine | site: what the allowance is counted against
    contractor: str = ""          # the main contractor (元請) who pays: 14-digit business ID
    pulse_ms: int = 200           # vend-line pulse
    drop_timeout_ms: int = 5000   # no drop sensed within this: the vend failed
    channel: str = "pulse"        # pulse (vend line + drop sensor) | mdb (cashless reader)
    price_ceiling: int = 200      # mdb: BEGIN SESSION funds (yen, scale 1): the dearest free drink
    session_s: float = 60.0       # mdb: how long a technician has to choose after the tap


@dataclass
class MetricsConfig:
    # Prometheus endpoint (HOST:PORT, e.g. 127.0.0.1:9465; port 0: any free port); empty: off.
    # Needs the [metrics] extra (prometheus-client); docs/operations.md, "Metrics".
    listen: str = ""


@dataclass
class AgentConfig:
    device: DeviceConfig
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    idlist: IdListConfig = field(default_factory=IdListConfig)
    readers: list[ReaderConfig] = field(default_factory=list)
    profiles: dict[str, ProfileConfig] = field(default_factory=dict)
    clock: ClockConfig = field(default_factory=ClockConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    vending: VendingConfig = field(default_factory=VendingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    version: int = 0              # config version, carried by every touch

    @property
    def data_dir(self) -> Path:
        return Path(self.device.data_dir)


def load(path: str | Path) -> AgentConfig:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> AgentConfig:
    cfg = _build(AgentConfig, raw, "")
    _check(cfg)
    return cfg


def _check(cfg: AgentConfig) -> None:
    if not DEVICE_ID.match(cfg.device.id):
        raise ConfigError("device.id: letters, digits, '-' and '_', at most 64")
    if not SITE_ID.match(cfg.device.site):
        raise ConfigError("device.site: a CCUS site ID is 14 ASCII digits")
    if cfg.device.role not in {r.value for r in Role}:
        raise ConfigError(f"device.role: one of {', '.join(r.value for r in Role)}")
    if not 1 <= cfg.mqtt.inflight <= 1000:
        raise ConfigError("mqtt.inflight: 1..1000")
    if not 0 <= cfg.version <= MAX_SEQ:  # every touch carries it (cv)
        raise ConfigError("version: 0..2**63-1")
    if not cfg.security.max_config_age_days > 0 or not cfg.idlist.max_issued_age_days > 0:
        raise ConfigError("security.max_config_age_days, idlist.max_issued_age_days: days > 0")
    _check_mqtt_timing(cfg.mqtt)
    _check_vending(cfg)
    _check_gate(cfg.gate)
    if cfg.metrics.listen:
        parse_listen(cfg.metrics.listen)
    names = set()
    for i, r in enumerate(cfg.readers):
        if r.name in names:
            raise ConfigError(f"readers[{i}].name: {r.name!r} is used twice")
        if not r.name or not fact_text_ok(r.name):
            # every touch carries it as its `reader` fact
            raise ConfigError(f"readers[{i}].name: 1..64 characters, no NUL")
        names.add(r.name)
        if r.direction not in ("in", "out"):
            raise ConfigError(f"readers[{i}].direction: 'in' or 'out'")
        if r.backend not in ("nfcpy", "pcsc"):
            raise ConfigError(f"readers[{i}].backend: 'nfcpy' or 'pcsc', not {r.backend!r}")
        if r.backend == "pcsc" and not r.path.startswith("pcsc:"):
            raise ConfigError(f"readers[{i}].path: a pcsc reader path starts with 'pcsc:'")
        if r.feedback not in ("reader", "hook", "none"):
            raise ConfigError(f"readers[{i}].feedback: 'reader', 'hook' or 'none'")
        if r.profile != "uid" and r.profile not in cfg.profiles:
            raise ConfigError(f"readers[{i}].profile: no [profiles.{r.profile}] table")
        bad = [t for t in r.targets if t not in ("212F", "424F", "106A", "106B")]
        if bad or not r.targets:
            raise ConfigError(f"readers[{i}].targets: choose from 212F, 424F, 106A, 106B")
    for name, p in cfg.profiles.items():
        _check_profile(f"profiles.{name}", p)


def _check_mqtt_timing(m: MqttConfig) -> None:
    if not 0.1 <= m.ack_timeout_s <= m.ack_timeout_max_s <= 86_400:
        raise ConfigError("mqtt.ack_timeout_s: 0.1 s up to mqtt.ack_timeout_max_s (<= 1 day)")
    if not 0.05 <= m.reconnect_min_s <= m.reconnect_max_s <= 3_600:
        raise ConfigError("mqtt.reconnect_min_s: 0.05 s up to mqtt.reconnect_max_s (<= 1 h)")
    if not m.reconnect_min_s <= m.reconnect_fast_max_s <= m.reconnect_max_s:
        raise ConfigError("mqtt.reconnect_fast_max_s: between mqtt.reconnect_min_s and "
                          "mqtt.reconnect_max_s")
    if m.protocol not in PROTOCOLS:
        raise ConfigError(f"mqtt.protocol: \"5\" or \"3.1.1\" (a string), not {m.protocol!r}")
    if m.subscribe_qos not in (0, 1):
        raise ConfigError("mqtt.subscribe_qos: 0 or 1")
    m.endpoints()  # each broker is HOST:PORT


def parse_broker(text: str, key: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port). Raises ConfigError naming `key`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {text!r}: HOST:PORT (e.g. \"nats-1.example.jp:1883\")")
    return host, int(port)


def _check_profile(where: str, p: ProfileConfig) -> None:
    if p.kind not in ("uid", "felica", "iso_dep"):
        raise ConfigError(f"{where}.kind: 'uid', 'felica' or 'iso_dep'")
    if p.encoding not in ("ascii", "bcd"):
        raise ConfigError(f"{where}.encoding: 'ascii' or 'bcd'")
    if not 0 <= p.system_code <= 0xFFFF or not 0 <= p.service_code <= 0xFFFF:
        raise ConfigError(f"{where}: system_code and service_code are 16-bit")
    if not 1 <= p.block_count <= 15 or not 0 <= p.block <= 0xFFFF:
        raise ConfigError(f"{where}.block_count: 1..15 blocks")
    if p.offset < 0 or not 1 <= p.length <= 64:
        raise ConfigError(f"{where}.length: 1..64, offset >= 0")
    if p.kind == "iso_dep":
        try:
            aid, fid = bytes.fromhex(p.aid), bytes.fromhex(p.file_id)
        except ValueError:
            raise ConfigError(f"{where}.aid/file_id: hex digits") from None
        if not 5 <= len(aid) <= 16:
            raise ConfigError(f"{where}.aid: 5..16 bytes of hex")
        if len(fid) not in (0, 2):
            raise ConfigError(f"{where}.file_id: 2 bytes of hex, or empty")
        if not 0 <= p.read_offset <= 0x7FFF or not 1 <= p.read_length <= 255:
            raise ConfigError(f"{where}.read_length: 1..255, read_offset 0..32767")


def parse_listen(text: str) -> tuple[str, int]:
    """metrics.listen 'HOST:PORT' -> (host, port); '[::1]:9465' too. Raises ConfigError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics.listen: {text!r}: HOST:PORT (e.g. 127.0.0.1:9465), "
                          "or empty for off")
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_gate(g: GateConfig) -> None:
    if g.relay_in not in (0, 1) or g.relay_out not in (0, 1):
        raise ConfigError("gate.relay_in, gate.relay_out: 0 or 1 (the board's two gate relays)")
    if not 1 <= g.pulse_ms <= 5000:
        raise ConfigError("gate.pulse_ms: 1..5000 (the board caps a pulse at 5 s)")
    if not 0 < g.passage_timeout_s <= 120 or not 0 < g.held_open_s <= 3600:
        raise ConfigError("gate.passage_timeout_s: 0..120 s; gate.held_open_s: 0..3600 s")
    if g.baud <= 0:
        raise ConfigError("gate.baud: a positive baud rate")


def _check_vending(cfg: AgentConfig) -> None:
    v = cfg.vending
    if cfg.device.role == "vending" and not v.serial:
        raise ConfigError("vending.serial: required for a vending machine (the board's port)")
    if v.period not in ("day", "week"):
        raise ConfigError("vending.period: 'day' or 'week'")
    if v.scope not in ("machine", "site"):
        raise ConfigError("vending.scope: 'machine' or 'site'")
    if v.channel not in ("pulse", "mdb"):
        raise ConfigError("vending.channel: 'pulse' or 'mdb'")
    if not 1 <= v.price_ceiling <= 0xFFFE:
        raise ConfigError("vending.price_ceiling: 1..65534 (yen)")
    if not 0 <= v.cut_hour <= 23:
        raise ConfigError("vending.cut_hour: 0..23")
    if v.limit < 1 or not 1 <= v.slot <= 4:
        raise ConfigError("vending.limit: at least 1; vending.slot: 1..4")
    if v.contractor and not SITE_ID.match(v.contractor):  # 事業者ID: 14 digits, like a site ID
        raise ConfigError("vending.contractor: a business ID is 14 ASCII digits")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{_join(where, sorted(unknown)[0])}: unknown key")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing (required)")
            continue
        kwargs[name] = _value(hints[name], raw[name], key)
    return cls(**kwargs)


def _value(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        (item,) = typing.get_args(hint)
        return [_value(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        _, item = typing.get_args(hint)
        return {k: _value(item, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported type")  # not used; keep the loader honest
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
