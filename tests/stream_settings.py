"""The settings of long-lived streams with their defaults, from `service.config.Settings`.

`python tests/stream_settings.py` rewrites docs/results/streams.md (then `make readme`);
tests/service/test_stream_lifecycle.py fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.config import Settings  # noqa: E402

STREAM_SETTINGS = (
    "stream_holds_sessions",
    "idle_ttl_s",
    "max_lifetime_s",
    "keepalive_time_s",
    "keepalive_timeout_s",
    "keepalive_permit_without_calls",
    "keepalive_min_client_ping_s",
    "keepalive_max_ping_strikes",
    "max_streams_per_connection",
    "max_open_streams",
    "evict_on_capacity",
    "lease_s",
)
OUT = ROOT / "docs" / "results" / "streams.md"


def table() -> str:
    """Render the settings table (markdown)."""
    lines = ["| setting (`RNNSERVE_...`) | default | what it does |", "|---|---|---|"]
    for name in STREAM_SETTINGS:
        field = Settings.model_fields[name]
        default = field.default
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, int | float):
            shown = f"{default:,}" if isinstance(default, int) else f"{default:g}"
        else:
            shown = str(default)
        lines.append(f"| `{name}` | {shown} | {field.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.write_text(table())
    print(f"wrote {OUT.relative_to(ROOT)}")
