"""Refinery studio: routes between the pages and draws the shared sidebar. Run: streamlit run app.py"""
import logging

import streamlit as st

from pages.components import sidebar

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
st.set_page_config(page_title="Refinery", page_icon=":material/filter_alt:", layout="wide")

navigation = st.navigation([
    st.Page("pages/data.py", title="Data", icon=":material/upload:", default=True),
    st.Page("pages/refine.py", title="Refine", icon=":material/filter_alt:"),
    st.Page("pages/embeddings.py", title="Embeddings", icon=":material/scatter_plot:"),
    st.Page("pages/inspect.py", title="Inspect", icon=":material/search:"),
    st.Page("pages/results.py", title="Results", icon=":material/analytics:"),
])
sidebar.draw()
navigation.run()
