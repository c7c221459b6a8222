"""`python -m services.control_plane [--host H] [--port P]`: serve the API with uvicorn, settings
from the environment (no local Ray is started here; `drpt-ray serve` does that)."""

from __future__ import annotations

import argparse
import sys

import uvicorn
from pydantic import ValidationError

from drpt_ray.wire import HOST, PORT
from services.control_plane.app import create_app
from services.control_plane.settings import Settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.control_plane")
    p.add_argument("--host", default=HOST)
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        from drpt_ray.config import format_validation_error

        print(format_validation_error(e, "control-plane settings"), file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
