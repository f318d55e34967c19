"""`ccus demo --console`: keep the demo's broker, agents and store up and serve the console on
them until Ctrl-C, with a throwaway operator account printed to the terminal."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

from console import auth, users


def _port(preferred: int = 8080) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(run: Any) -> None:
    """Serve the console on a running demo (demo.site_day.DemoRun) until Ctrl-C."""
    import uvicorn

    from console.app import Config, build_app
    from console.live import Bridge
    from ops.mqttc import BrokerOpts

    data: Path = run.data
    password = secrets.token_urlsafe(12)
    users.save(data / "console-users.toml", {"demo": users.User(
        "demo", "operator", auth.hash_password(password))})
    bridge = Bridge()
    bridge.start(BrokerOpts("127.0.0.1", run.broker.port), "console-demo")
    # plain HTTP on loopback, and curl or a script may look too: no Secure flag for the demo
    cfg = Config(str(run.store_path), data / "console-users.toml", secrets.token_urlsafe(32),
                 secure_cookies=False)
    port = _port()
    print(f"\nconsole: http://127.0.0.1:{port}/  user demo, password {password}\n"
          "  (fleet, live touches, work history of 2026年11月 ...; Ctrl-C stops the console and "
          "the demo, then prints the work history)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(build_app(cfg, bridge), host="127.0.0.1", port=port,
                                      log_level="warning", timeout_graceful_shutdown=1)).run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; here it means: the demo goes on to its end
    finally:
        bridge.stop()
