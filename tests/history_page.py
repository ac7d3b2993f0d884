"""The browser panel's history page, checked in a real browser: for a test with calls in the monitor's store.

    with chromium(viewport={"width": 1280, "height": 900}) as ctx:
        check_history_page(ctx.new_page(), f"http://127.0.0.1:{port}/?token={TOKEN}", [call_id], ARTIFACTS)
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def history_url(base_url: str) -> str:
    """``/history`` on the server of ``base_url``, with the query of ``base_url`` (its ``?token=``)."""
    u = urlsplit(base_url)
    path = u.path.rstrip("/") + "/history"
    return urlunsplit((u.scheme, u.netloc, path, u.query, ""))


def check_history_page(page, base_url: str, expect_calls: list[str], artifacts: Path) -> None:
    """Open ``/history``, find the calls ``expect_calls`` (their ids) in the table, open the first one.

    ``base_url``: the server's address with its token if it has one
    (``http://127.0.0.1:PORT/?token=TOKEN``); the calls must have started in
    the last day (the page's default).  Checks the table (a row and a score
    bar per call, sorting by a column), a call's page (its chart drawn with
    points, a card per stream), the back button, and that the page logged no
    errors and asked nothing of other hosts.  Screenshots:
    ``artifacts/history.png`` (the list) and ``artifacts/history-call.png``.
    """
    from playwright.sync_api import expect

    assert expect_calls, "no calls to look for"
    artifacts.mkdir(parents=True, exist_ok=True)
    origin = urlsplit(base_url).netloc
    errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("request", lambda r: origin not in r.url and not r.url.startswith("data:") and foreign.append(r.url))

    page.goto(history_url(base_url))
    rows = page.locator("#calls-body tr[data-call]")
    expect(rows.first).to_be_visible(timeout=15_000)
    expect(page.locator("#notice")).to_be_hidden()  # no refused token, no missing store
    for call_id in expect_calls:
        row = page.locator(f'#calls-body tr[data-call="{call_id}"]')
        expect(row).to_have_count(1)
        expect(row.locator(".call-link")).not_to_be_empty()
        expect(row.locator(".bar .bar-fill")).to_have_count(1)
    expect(page.locator("#list-count")).to_have_text(re.compile(r"^\d+ of \d+ calls?$"))

    # A header click sorts by its column (lowest mean first: the worst calls of a MOS list), again the other way.
    mean = page.locator('#calls th[data-sort="mean"]')
    mean.locator("button").click()
    expect(mean).to_have_attribute("aria-sort", re.compile("ascending|descending"))
    first = mean.get_attribute("aria-sort")
    means = [float(m) for m in rows.evaluate_all("rs => rs.map((r) => r.dataset.mean)") if m]
    assert means == sorted(means, reverse=first == "descending"), means
    mean.locator("button").click()
    expect(mean).not_to_have_attribute("aria-sort", first)
    started = page.locator('#calls th[data-sort="started"]')
    started.locator("button").click()
    expect(started).to_have_attribute("aria-sort", "descending")  # newest first, as the server sends them
    page.screenshot(path=str(artifacts / "history.png"), full_page=True)

    # A row opens its call: the address names it, the chart fills, each stream has a card.
    call_id = expect_calls[0]
    page.locator(f'#calls-body tr[data-call="{call_id}"] td.when').click()
    expect(page).to_have_url(re.compile(r"#call="))
    expect(page.locator("#call-view")).to_be_visible()
    page.wait_for_selector("#call-chart canvas", timeout=15_000)
    page.wait_for_function("+document.getElementById('call-chart').dataset.points > 0", timeout=15_000)
    expect(page.locator("#call-who")).not_to_be_empty()
    expect(page.locator("#stream-cards .stream-card").first).to_be_visible()
    expect(page.locator("#notice")).to_be_hidden()
    page.wait_for_timeout(200)  # let the chart paint
    page.screenshot(path=str(artifacts / "history-call.png"), full_page=True)

    # Back: the list again, as it was.
    page.go_back()
    expect(page.locator("#list-view")).to_be_visible()
    expect(page.locator(f'#calls-body tr[data-call="{call_id}"]')).to_have_count(1)

    assert not errors, errors
    assert not foreign, f"requests beyond the server: {foreign}"
