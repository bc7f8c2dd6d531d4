"""The Refine form's widget arguments, read from FitConfig's field declarations (``core.config.FIT_PARAMS``).

Label, help, choices and range of every widget come from the field it sets, so the form offers
exactly what :meth:`core.config.FitConfig.validate` accepts, within the practical range the field
declares for forms (``form_min`` / ``form_max`` / ``form_values``). Pure functions: no Streamlit
here; each returns the keyword arguments of one widget, keyed by the field's name.
"""
from __future__ import annotations

from typing import Any, Sequence

from core.config import FIT_PARAMS
from core.params import options_of


def choice(name: str, value: Any, options: Sequence[Any] | None = None) -> dict:
    """``st.selectbox`` arguments: the field's options (or ``options``, a subset of them), ``value`` chosen."""
    options = tuple(options if options is not None else options_of(FIT_PARAMS[name].constraints))
    return {**_common(name), "options": options, "index": options.index(value)}


def number(name: str, value: int | float) -> dict:
    """``st.number_input`` arguments: the field's form range, ``value`` shown."""
    low, high = FIT_PARAMS[name].form_range()
    return {**_common(name), "min_value": low, "max_value": high, "value": value}


def steps(name: str, value: Any) -> dict:
    """``st.select_slider`` arguments: the values the field declares for forms, ``value`` chosen."""
    return {**_common(name), "options": FIT_PARAMS[name].form_values, "value": value}


def switch(name: str, value: bool) -> dict:
    """``st.toggle`` arguments."""
    return {**_common(name), "value": value}


def text(name: str, value: Any) -> dict:
    """``st.text_input`` arguments, ``value`` as text (read back with the field's parser, e.g. ``parse_gamma``)."""
    return {**_common(name), "value": str(value)}


def _common(name: str) -> dict:
    spec = FIT_PARAMS[name]
    return {"label": spec.label or name, "help": spec.help, "key": name}
