"""Shared UI pieces of the studio's pages (not a page itself): session state, cached engine
resources, the sidebar, charts and widgets. Nothing here decides anything the engine should."""
