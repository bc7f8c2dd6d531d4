"""Playwright helpers shared by the browser tests: the studio's main area, clean pages, navigation.

Import after the test module has skipped itself when playwright or chromium is missing.
"""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect


def main_area(page):
    return page.get_by_test_id("stMain")


def assert_clean(page) -> None:
    """No traceback, exception block or error boundary message anywhere on the page."""
    content = page.content()
    assert "Traceback" not in content
    assert "Something went wrong" not in content
    expect(page.get_by_test_id("stException")).to_have_count(0)


def goto_page(page, title: str) -> None:
    """Open a page through the sidebar navigation and wait for its title."""
    page.get_by_test_id("stSidebarNavLink").filter(has_text=title).click()
    expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible()


def query_param(page, name: str) -> str | None:
    """A parameter of the page's URL (``run``, ``job``), or None."""
    return parse_qs(urlparse(page.url).query).get(name, [None])[0]


def selectbox_options(page, label: str) -> list[str]:
    """The options of the selectbox labelled ``label``, read by opening its list and closing it again."""
    combobox = page.get_by_test_id("stSelectbox").filter(has_text=label).get_by_role("combobox")
    combobox.scroll_into_view_if_needed()  # clicked where the click itself scrolls to (the main area's
    combobox.click()                       # bottom edge), a selectbox opens no list
    options = page.get_by_role("option")
    expect(options.first).to_be_visible()
    names = options.all_inner_texts()
    page.keyboard.press("Escape")
    expect(options).to_have_count(0)
    return names
