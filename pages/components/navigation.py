"""The studio's pages, defined once: ``app.py``'s navigation and every link or switch between pages use them.

A :class:`StudioPage` says which script a page runs, its title and its icon; :meth:`StudioPage.page` makes
the ``st.Page`` object that ``st.navigation``, ``st.page_link`` and ``st.switch_page`` take. That object is
made anew in every script run, never kept: ``st.navigation`` marks the objects it is given, so one object
shared by all sessions would be state shared between them. A page's script is named by its absolute path,
so the same definition holds in ``app.py`` and in a page run on its own (``streamlit run pages/x.py``),
whose main script's folder is ``pages/`` itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import streamlit as st

from pages.components import state

log = logging.getLogger("refinery.app")

PAGES_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StudioPage:
    """One page of the studio: its script in ``pages/``, its title and its icon (its URL is the script's name)."""

    script: str
    title: str
    icon: str
    default: bool = False  # opened at the app's root URL

    @property
    def path(self) -> Path:
        """The page's script, absolute (``AppTest.switch_page`` takes it as ``str(page.path)``)."""
        return PAGES_DIR / self.script

    def page(self) -> st.Page:
        """The ``st.Page`` for this script run."""
        return st.Page(self.path, title=self.title, icon=self.icon, default=self.default)


DATA = StudioPage("data.py", "Data", ":material/upload:", default=True)
REFINE = StudioPage("refine.py", "Refine", ":material/filter_alt:")
EMBEDDINGS = StudioPage("embeddings.py", "Embeddings", ":material/scatter_plot:")
INSPECT = StudioPage("inspect.py", "Inspect", ":material/search:")
RESULTS = StudioPage("results.py", "Results", ":material/analytics:")
SCORE = StudioPage("score.py", "Score", ":material/playlist_add_check:")
PAGES = (DATA, REFINE, EMBEDDINGS, INSPECT, RESULTS, SCORE)
"""Every page, in the order the navigation menu lists them."""


def studio_navigation() -> st.Page:
    """``st.navigation`` over every page, for ``app.py``; returns the page to run.

    It also marks the session as the studio's, the only one in which the other pages exist
    (see :func:`link`).
    """
    st.session_state[state.IN_STUDIO] = True
    return st.navigation([page.page() for page in PAGES])


def link(page: StudioPage, label: str, icon: str | None = None, where=st) -> None:
    """A link to ``page``, drawn in ``where`` (``st`` or a column), with the page's own icon unless ``icon``.

    Left out when the page runs on its own (``streamlit run pages/x.py``, ``AppTest`` of one page):
    without ``app.py``'s navigation the other pages do not exist, and the link would lead nowhere.
    """
    if not st.session_state.get(state.IN_STUDIO, False):
        log.debug("no link to %s: the page runs without the studio's navigation", page.title)
        return
    where.page_link(page.page(), label=label, icon=icon)


def switch_to(page: StudioPage) -> NoReturn:
    """Stop this page's run and open ``page``, as the navigation menu would."""
    st.switch_page(page.page())


def inspect_sample(sample_id: str) -> NoReturn:
    """Open ``sample_id`` on the Inspect page."""
    state.open_in_inspect(sample_id)
    switch_to(INSPECT)
