"""Refinery studio: routes between the pages and draws the shared sidebar. Run: streamlit run app.py"""
import logging

import streamlit as st

from pages.components import navigation, sidebar

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
st.set_page_config(page_title="Refinery", page_icon=":material/filter_alt:", layout="wide")

page = navigation.studio_navigation()
sidebar.draw()
page.run()
