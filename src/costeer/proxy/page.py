"""The chat page `costeer proxy` serves at `/`: plain HTML, CSS and JS shipped in the
package (static/), no CDN and no build step.

The page holds no secret, so it is served without the key (a browser cannot send one
when it opens a URL); the Host check still applies, so a rebinding DNS name cannot load
it. Its requests to the API are same-origin (the proxy's own origin is allowed) and
carry the key the user types in, kept in sessionStorage. A strict Content-Security-Policy
lets the page run only its own script and talk only to the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from fastapi.responses import Response

STATIC = "static"
# no inline script or style, nothing from elsewhere, no framing, no form posts
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # a new version of the package shows at the next load
}


@dataclass(frozen=True)
class Asset:
    file: str
    media_type: str

    def response(self) -> Response:
        return Response(_read(self.file), media_type=self.media_type, headers=SECURITY_HEADERS)


# URL path -> file in static/
PAGE_ASSETS: dict[str, Asset] = {
    "/": Asset("index.html", "text/html; charset=utf-8"),
    "/static/app.js": Asset("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": Asset("style.css", "text/css; charset=utf-8"),
    "/static/icon.svg": Asset("icon.svg", "image/svg+xml"),
}
PAGE_PATHS = frozenset(PAGE_ASSETS)


@cache
def _read(name: str) -> bytes:
    return files(__package__).joinpath(STATIC, name).read_bytes()
