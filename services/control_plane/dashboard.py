"""The web dashboard at `/ui` (docs/dashboard.md): static pages (`ui/`) that call the API from the
browser with the token the user types in. The files hold no data, so they are served without a
token; every job, sweep and log they show comes from the token-guarded `/v1` routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Response
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().with_name("ui")

# The page holds the API token (in sessionStorage), so no script but its own may run: a CSP that
# allows only same-origin files (no inline script, no CDN), no framing (a hidden frame could click
# the cancel button for another page), and no Referer that could carry a URL elsewhere.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so a new release's pages are seen at once
}


class _Pages(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve `ui/` at `/ui/` (`/ui` redirects there; index.html is the one page, routed by its hash)."""

    @app.get("/ui", include_in_schema=False)
    def ui_slash() -> Response:
        # A relative Location: Starlette's own slash redirect builds an absolute URL from the Host
        # header, which a client controls.
        return Response(status_code=307, headers={"Location": "/ui/"})

    app.mount("/ui", _Pages(directory=UI_DIR, html=True), name="ui")
