"""The Refine form's widgets are built from FitConfig's declarations: they offer nothing validate() refuses.

Pure functions (pages.components.fit_fields), tested without Streamlit; the page itself is tested in
test_app_pages.py.
"""
import pytest

from core.config import FIT_PARAMS, OBJECTIVES, TABLE_OBJECTIVES, FitConfig
from core.params import interval_of, options_of
from pages.components import fit_fields

NUMBERS = ("ensemble", "rounds", "seed", "epochs", "retrain_epochs")
CHOICES = ("objective", "detector", "refine_detector", "threshold_source", "device", "backbone", "localization",
           "encoder", "image_score")


@pytest.mark.parametrize("name", NUMBERS)
def test_a_number_widget_offers_a_range_inside_the_fields_constraint(name):
    default = getattr(FitConfig(), name)
    widget = fit_fields.number(name, default)
    low, high = widget["min_value"], widget["max_value"]
    interval = interval_of(FIT_PARAMS[name].constraints)
    assert interval.accepts(low) and interval.accepts(high) and low <= default <= high
    for value in (low, high):  # both ends pass validate() with the other fields at their defaults
        FitConfig(**{name: value}).validate()


def test_the_image_size_slider_offers_only_sizes_validate_accepts():
    widget = fit_fields.steps("image_size", 224)
    assert 224 in widget["options"] and 64 in widget["options"]  # the default and engine.suggested_config's small size
    for size in widget["options"]:
        FitConfig(image_size=size).validate()


@pytest.mark.parametrize("name", CHOICES)
def test_a_choice_widget_offers_exactly_the_fields_options(name):
    widget = fit_fields.choice(name, getattr(FitConfig(), name))
    assert widget["options"] == options_of(FIT_PARAMS[name].constraints)
    assert widget["options"][widget["index"]] == getattr(FitConfig(), name)


def test_tables_are_offered_a_subset_of_the_objectives():
    assert set(TABLE_OBJECTIVES) <= set(OBJECTIVES)
    assert fit_fields.choice("objective", "none", TABLE_OBJECTIVES)["options"] == TABLE_OBJECTIVES


@pytest.mark.parametrize("name", [*NUMBERS, *CHOICES, "image_size", "refine", "gamma"])
def test_every_widget_is_labelled_and_explained_by_its_field(name):
    spec = FIT_PARAMS[name]
    widget = fit_fields.switch(name, True)
    assert widget == {"label": spec.label, "help": spec.help, "key": name, "value": True}
    assert spec.label, f"{name} is in the Refine form, so it declares a label"
