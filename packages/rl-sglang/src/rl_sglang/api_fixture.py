"""SGLang's own API as read from the pinned wheel (`sglang_api.json`, written by
`tools/sglang_fixture.py`): routes, request structures, `launch_server` flags, session routes.

No SGLang import: the fixture is plain JSON shipped in this package, so flag checks and the
conformance tests work where SGLang cannot be installed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).with_name("sglang_api.json")


@functools.cache
def sglang_api() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def launch_server_flags() -> dict[str, dict[str, Any]]:
    """`--flag` → {dest, takes ("none" | "one" | "list"), type, choices}."""
    return sglang_api()["flags"]
