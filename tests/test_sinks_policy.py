"""The HTTP policy (a site's and the feed's) with plain data: no socket, no event loop, no sleep.

Every refusal and every acceptance a site and the feed make before a websocket
upgrade, decided from a request (method, path, headers), the settings and the
client count.
"""

from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.http.policy import (
    PAGES,
    TOKEN_ENV,
    HttpRequest,
    Listen,
    ServeError,
    SitePolicy,
    content_type,
    files_request,
    parse_listen,
    response,
    static_file,
    unrouted,
)
from scoreq_live.sinks import server
from scoreq_live.sinks.feed import MAX_SUBSCRIBED
from scoreq_live.sinks.policy import PANEL_DIR, FeedPolicy, subscription

LOCAL_WS, LOCAL_HTTP = Listen("127.0.0.1", 8765), Listen("127.0.0.1", 8080)
PUBLIC_HTTP = Listen("0.0.0.0", 8080)
LOCAL = FeedPolicy(ws=LOCAL_WS, panel_port=8080)
PUBLIC = FeedPolicy(token="s3cret", ws=Listen("0.0.0.0", 8765), panel_port=8080)


def req(path, method="GET", **headers):
    """A request with a Host header for the HTTP port unless told (``Origin=...``, ``Authorization=...``)."""
    headers.setdefault("Host", "127.0.0.1:8080")
    return HttpRequest.build(path, {k: v for k, v in headers.items() if v is not None}, method=method)


def ws(policy, path="/", clients=0, **headers):
    headers.setdefault("Host", "127.0.0.1:8765")
    return policy.ws_request(req(path, **headers), clients=clients)


def route(policy, request, clients, metrics, panel):
    """The decision of the route a path goes to on a site with the panel, ``/metrics`` and the feed."""
    path = urlsplit(request.path).path
    if path == "/ws":
        return policy.feed_request(request, clients, http=True)
    if path == "/metrics":
        return policy.metrics_request(request, metrics)
    if path in PAGES or path.startswith("/static/"):
        return files_request(request, panel)
    return unrouted(request)


def http(policy, path, method="GET", clients=0, metrics=None, panel=PANEL_DIR, where=LOCAL_HTTP, **headers):
    """What such a site (on ``where``) answers before an upgrade: its Host check first, then the route's."""
    r = req(path, method, **headers)
    return policy.check_host(r, where) or route(policy, r, clients, metrics, panel)


def text(resp):
    return resp.body.decode()


# --- listen addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9000", Listen("127.0.0.1", 9000)),
    ("[::1]:9000", Listen("::1", 9000)),
    ("[::1]", Listen("::1", 1)),
    ("[::]:0", Listen("::", 0)),
    ("::1", Listen("::1", 1)),
    ("example.com:", Listen("example.com", 1)),  # an empty port is the default one
  # a bare IPv6 address is a host: its last group is no port
    (":9000", Listen("127.0.0.1", 9000)),
    ("9000", Listen("127.0.0.1", 9000)),
    (" 0.0.0.0:80 ", Listen("0.0.0.0", 80)),
    ("localhost", Listen("localhost", 1)),
    ("example.com", Listen("example.com", 1)),
    ("example.com:65535", Listen("example.com", 65535)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text, 1) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:http", "127.0.0.1:65536", "[::1]:x", "host:-1", "[::1]:99999"])
def test_parse_listen_refuses_a_bad_port(text):
    with pytest.raises(ServeError, match="cannot read listen address") as e:
        parse_listen(text, 8765)
    assert "127.0.0.1:8765" in str(e.value) and e.value.__cause__ is None


def test_loopback_addresses_and_their_text():
    assert all(Listen(h, 1).loopback for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "LOCALHOST"))
    assert not any(Listen(h, 1).loopback for h in ("0.0.0.0", "::", "192.168.1.2", "example.com", "localhost.evil"))
    assert str(Listen("::1", 80)) == "[::1]:80" and str(Listen("127.0.0.1", 80)) == "127.0.0.1:80"


def test_the_names_the_command_line_and_the_feed_use():
    from scoreq_live.http.site import DEFAULT_HTTP_PORT

    assert server.Listen is Listen and server.ServeError is ServeError  # FeedServer's own signature names them
    assert issubclass(ServeError, ScoreqLiveError)
    assert (TOKEN_ENV, server.DEFAULT_WS_PORT, DEFAULT_HTTP_PORT) == ("SCOREQ_LIVE_TOKEN", 8765, 8080)


# --- settings -----------------------------------------------------------------------------------


def test_settings_are_normalised_and_frozen():
    p = FeedPolicy(token="", allowed_origins=frozenset({" HTTPS://Noc.Example.com/ "}))
    assert p.token is None and p.allowed_origins == {"https://noc.example.com"} and p.max_clients == 256
    site = SitePolicy(token="", allowed_origins=[" HTTPS://Noc.Example.com/ "])
    assert FeedPolicy.under(site, max_clients=3) == replace(p, max_clients=3)  # the feed under a site's rules
    with pytest.raises(AttributeError):
        p.token = "x"  # type: ignore[misc]
    assert replace(p, max_clients=3).allowed_origins == p.allowed_origins  # replace() keeps it normalised


def test_a_websockets_request_is_read_with_or_without_its_method():
    r = Request("/ws?token=x", Headers(Host="127.0.0.1"))
    assert HttpRequest.of(r) == HttpRequest("GET", "/ws?token=x", r.headers)

    class Old:  # what websockets < 17 parses: GET only, no method attribute
        path, headers = "/", Headers()

    assert HttpRequest.of(Old()).method == "GET"  # type: ignore[arg-type]


# --- Host: DNS rebinding ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "LocalHost", "[::1]:8080", "::1",
                                  "127.0.0.2:8080", "noc.example.com:8080"])
def test_a_loopback_server_answers_its_own_names(host):
    p = replace(LOCAL, allowed_origins=frozenset({"https://noc.example.com"}))
    assert http(p, "/ws", Host=host) is None
    assert ws(p, Host=host) is None


@pytest.mark.parametrize("host", ["attacker.example:8080", "attacker.example", "127.0.0.1.nip.io", "[::2]:80"])
def test_a_loopback_server_refuses_other_names(host):
    for resp in (http(LOCAL, "/metrics", Host=host), http(LOCAL, "/", Host=host), http(LOCAL, "/ws", Host=host),
                 ws(LOCAL, Host=host)):
        assert resp.status_code == 403 and text(resp).startswith(f"host {host!r} is not served here")
        assert "--allowed-origin" in text(resp)


def test_the_host_check_is_for_loopback_servers_only():
    assert ws(PUBLIC, "/?token=s3cret", Host="feed.example.org:8765") is None
    assert http(PUBLIC, "/", Host="feed.example.org:8080", where=PUBLIC_HTTP).status_code == 200
    assert http(LOCAL, "/", Host=None).status_code == 200  # HTTP/1.0 without Host: nothing to rebind
    no_address = FeedPolicy()
    assert no_address.check_host(req("/", Host="evil.example"), None).status_code == 403  # unknown: strict


# --- Origin -------------------------------------------------------------------------------------


def test_origins_on_the_http_servers_feed():
    assert http(LOCAL, "/ws", Origin="http://127.0.0.1:8080") is None  # the panel: same origin
    assert http(LOCAL, "/ws", Origin="HTTP://127.0.0.1:8080/") is None
    assert http(LOCAL, "/ws") is None  # not a browser: no Origin
    for origin in ("http://evil.example", "null", "http://127.0.0.1:8081", "http://localhost:8080"):
        resp = http(LOCAL, "/ws", Origin=origin)
        assert resp.status_code == 403 and text(resp) == (f"origin {origin!r} is not allowed; "
                                                          "add it with --allowed-origin\n")


def test_origins_on_the_standalone_feed():
    assert ws(LOCAL, Origin="http://127.0.0.1:8080") is None  # the panel on the HTTP port, same host name
    assert ws(LOCAL, Origin="http://localhost:8080", Host="localhost:8765") is None
    assert ws(LOCAL, Origin="http://[::1]:8080", Host="[::1]:8765") is None
    assert ws(LOCAL, Origin="http://127.0.0.1:8765").status_code == 403  # its own port serves no page
    assert ws(LOCAL, Origin="http://localhost:8080").status_code == 403  # another host name
    assert ws(replace(LOCAL, panel_port=None), Origin="http://127.0.0.1:8080").status_code == 403  # no panel
    assert LOCAL.origin_allowed("http://127.0.0.1:8080", None, http=False) is False  # no Host to compare with


def test_listed_origins_and_any():
    listed = replace(LOCAL, allowed_origins=frozenset({"https://noc.example.com"}))
    assert ws(listed, Origin="https://noc.example.com") is None
    assert http(listed, "/ws", Origin="https://NOC.example.com/") is None
    assert ws(listed, Origin="https://noc.example.com:444").status_code == 403
    anyone = replace(LOCAL, allowed_origins=frozenset({"*"}))
    assert ws(anyone, Origin="null") is None and http(anyone, "/ws", Origin="http://evil.example") is None


# --- token --------------------------------------------------------------------------------------


def test_the_token_by_header_or_query():
    for call in (lambda **h: ws(PUBLIC, **h), lambda **h: http(PUBLIC, "/ws", **h)):
        assert call(Authorization="Bearer s3cret") is None
        assert call(Authorization="bearer  s3cret ") is None
    assert ws(PUBLIC, "/?token=s3cret") is None and http(PUBLIC, "/ws?streams=a&token=s3cret") is None


def test_a_missing_token_is_refused_with_401():
    for resp in (ws(PUBLIC), http(PUBLIC, "/ws"), http(PUBLIC, "/metrics"), ws(PUBLIC, "/?token="),
                 ws(PUBLIC, Authorization="Basic czNjcmV0")):
        assert resp.status_code == 401 and "token is required" in text(resp)
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="scoreq-live"'


def test_a_wrong_token_is_refused_with_401():
    for resp in (ws(PUBLIC, "/?token=wrong"), http(PUBLIC, "/ws", Authorization="Bearer S3CRET"),
                 http(PUBLIC, "/metrics?token=s3cre"), ws(PUBLIC, "/?token=s3cret", Authorization="Bearer x")):
        assert resp.status_code == 401 and text(resp) == "wrong token\n"
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="scoreq-live", error="invalid_token"'


def test_the_token_is_compared_in_constant_time(monkeypatch):
    import hmac

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert ws(PUBLIC, "/?token=wrong").status_code == 401
    assert seen == [(b"wrong", b"s3cret")]


def test_the_panel_files_need_no_token(panel):
    assert http(PUBLIC, "/", panel=panel).status_code == 200
    assert http(PUBLIC, "/static/panel.js", panel=panel).status_code == 200


# --- ?streams=, client count --------------------------------------------------------------------


def test_a_bad_subscription_is_refused_with_400():
    many = ",".join(str(i) for i in range(MAX_SUBSCRIBED + 1))
    for resp in (ws(LOCAL, f"/?streams={many}"), http(LOCAL, f"/ws?streams={many}"),
                 ws(LOCAL, "/?streams=" + "x" * 10_000)):
        assert resp.status_code == 400 and text(resp).startswith("bad ?streams=: at most")
    assert ws(LOCAL, "/?streams=a,b") is None and ws(LOCAL, "/?streams=*") is None
    assert subscription({"streams": ["a,b", "c"]}) == {"a", "b", "c"} and subscription({}) is None


def test_too_many_clients_is_503_with_retry_after():
    p = replace(LOCAL, max_clients=3)
    assert ws(p, clients=2) is None and http(p, "/ws", clients=2) is None
    for resp in (ws(p, clients=3), http(p, "/ws", clients=4)):
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        assert text(resp) == "too many clients (at most 3); try again later\n"
    assert http(p, "/", clients=10).status_code == 200  # the panel itself is not a client


def test_the_order_of_the_checks():
    p = replace(PUBLIC, max_clients=1, ws=LOCAL_WS)
    bad_all = dict(Host="evil.example", Origin="http://evil.example")
    assert ws(p, "/?streams=" + "x" * 10_000, clients=5, **bad_all).status_code == 403  # Host first
    assert "origin" in text(ws(p, "/?streams=" + "x" * 10_000, clients=5, Origin="http://evil.example"))
    assert ws(p, "/?streams=" + "x" * 10_000, clients=5).status_code == 401  # then the token
    assert ws(p, "/?token=s3cret&streams=" + "x" * 10_000, clients=5).status_code == 400  # then ?streams=
    assert ws(p, "/?token=s3cret", clients=5).status_code == 503  # then the count


# --- routing: methods, metrics, panel files ------------------------------------------------------


def test_only_get_and_head_except_for_the_feed():
    for method in ("POST", "DELETE", "PUT", "OPTIONS"):
        for path in ("/", "/static/panel.js", "/metrics", "/nothing"):
            resp = http(LOCAL, path, method)
            assert resp.status_code == 405 and resp.headers["Allow"] == "GET, HEAD" and text(resp)
    # /ws goes on to the handshake, which refuses anything but an upgrade GET itself.
    assert http(LOCAL, "/ws", "POST") is None


def test_metrics(panel):
    body = b"# HELP x\nx 1\n"
    calls = []

    def metrics():
        calls.append(1)
        return body, "text/plain; version=0.0.4; charset=utf-8"

    resp = http(LOCAL, "/metrics", metrics=metrics)
    assert resp.status_code == 200 and resp.body == body and resp.headers["Content-Type"].startswith("text/plain")
    assert resp.headers["Cache-Control"] == "no-store"
    head = http(LOCAL, "/metrics", "HEAD", metrics=metrics)
    assert head.status_code == 200 and head.body == b"" and head.headers["Content-Length"] == str(len(body))
    resp = http(LOCAL, "/metrics")
    assert resp.status_code == 404 and text(resp) == "no metrics here\n"
    assert http(LOCAL, "/metrics", "HEAD").body == b""
    assert http(PUBLIC, "/metrics", metrics=metrics).status_code == 401 and len(calls) == 2  # not called
    assert http(PUBLIC, "/metrics", metrics=metrics, Authorization="Bearer s3cret").status_code == 200


def test_the_index_page(panel):
    for path in ("/", "/index.html", "/?token=x", "/index.html?x=1#frag"):
        resp = http(LOCAL, path, panel=panel)
        assert resp.status_code == 200 and resp.body.startswith(b"<!doctype html>")
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Referrer-Policy"] == "no-referrer"  # a ?token= in the page URL must not leak
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Content-Length"] == str(len(resp.body)) and resp.headers["Connection"] == "close"
    assert "Referrer-Policy" not in http(LOCAL, "/static/panel.js", panel=panel).headers
    assert http(LOCAL, "/", panel=panel / "vendor").status_code == 404  # a panel folder without it


def test_the_default_panel_folder_has_an_index():
    resp = http(LOCAL, "/")
    assert resp.status_code == 200 and b"<html" in resp.body.lower()


def test_the_history_page_is_served_at_history_without_a_token():
    for path in ("/history", "/history.html", "/history?token=x#call=1"):
        resp = http(LOCAL, path)
        assert resp.status_code == 200 and b"history.js" in resp.body, path
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert http(LOCAL, "/history/x").status_code == 404


def test_static_files_and_their_types(panel):
    for path, ctype, body in (("/static/panel.js", "text/javascript; charset=utf-8", b"console.log('hi')"),
                              ("/static/panel.css", "text/css; charset=utf-8", b"body{}"),
                              ("/static/vendor/lib.min.js", "text/javascript; charset=utf-8", b"var x"),
                              ("/static/vendor%2flib.min.js", "text/javascript; charset=utf-8", b"var x"),
                              ("/static/inside.js", "text/javascript; charset=utf-8", b"console.log('hi')")):
        resp = http(LOCAL, path, panel=panel)
        assert (resp.status_code, resp.headers["Content-Type"], resp.body) == (200, ctype, body), path
        assert resp.headers["Content-Length"] == str(len(body))


def test_head_has_the_headers_of_get_and_no_body(panel):
    get, head = http(LOCAL, "/static/panel.js", panel=panel), http(LOCAL, "/static/panel.js", "HEAD", panel=panel)
    assert head.status_code == 200 and head.body == b"" and head.headers["Content-Length"] == "17"
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    missing = http(LOCAL, "/nothing", "HEAD", panel=panel)
    assert missing.status_code == 404 and missing.body == b"" and missing.headers["Content-Length"] == "10"


@pytest.mark.parametrize("path", [
    "/static/../server.py", "/static/%2e%2e/server.py", "/static/vendor/", "/static/vendor", "/static/",
    "/static/.secret", "/static/%2esecret", "/static/link.txt", "/static//etc/passwd", "/static/..%2f..%2foutside.txt",
    "/static/vendor%5c..%5cpanel.js", "/static/vendor/./lib.min.js", "/static/panel.js%00.txt", "/static/nope.js",
    "/nothing", "/index.htm", "/static", "/panel.js", "/metrics/", "/ws/",
])
def test_not_found(panel, path):
    resp = http(LOCAL, path, panel=panel)
    assert resp.status_code == 404 and text(resp) == "not found\n", path


def test_static_file_stays_inside_the_folder(panel):
    assert static_file(panel, "vendor/lib.min.js") == (panel / "vendor" / "lib.min.js").resolve()
    assert static_file(panel, "vendor%2Flib.min.js") == (panel / "vendor" / "lib.min.js").resolve()
    assert static_file(panel, "inside.js") == (panel / "panel.js").resolve()  # a link that stays inside
    for rel in ("link.txt", "../outside.txt", "%2e%2e/outside.txt", ".secret", "vendor", "", "a\\b", "x\x00",
                "/etc/passwd", "vendor//lib.min.js", "nope"):
        assert static_file(panel, rel) is None, rel
    assert static_file(panel / "missing", "index.html") is None


def test_content_types():
    for name, ctype in (("a.html", "text/html; charset=utf-8"), ("a.JS", "text/javascript; charset=utf-8"),
                        ("a.mjs", "text/javascript; charset=utf-8"), ("a.css", "text/css; charset=utf-8"),
                        ("a.json", "application/json"), ("a.js.map", "application/json"),
                        ("x.svg", "image/svg+xml"), ("a.png", "image/png"), ("favicon.ico", "image/x-icon"),
                        ("f.woff2", "font/woff2"), ("LICENSE.txt", "text/plain; charset=utf-8"),
                        ("a.gif", "image/gif"), ("noext", "application/octet-stream")):
        assert content_type(Path(name)) == ctype, name


def test_every_response_is_complete():
    r = response(418, "short and stout\n", headers={"X-Extra": "1"})
    assert (r.status_code, r.reason_phrase, r.body) == (418, "I'm a Teapot", b"short and stout\n")
    h = r.headers
    assert h["Content-Type"] == "text/plain; charset=utf-8" and h["Content-Length"] == "16" and h["X-Extra"] == "1"
    assert h["Connection"] == "close" and h["X-Content-Type-Options"] == "nosniff"
    assert h["Cache-Control"] == "no-store" and h["Date"].endswith(" GMT")
    assert response(200, b"abc", head=True).body == b"" and response(200, b"abc", head=True).headers[
        "Content-Length"] == "3"
