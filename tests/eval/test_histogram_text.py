"""User text in the routing figure (question types, title) is drawn as plain text: a '$' is a dollar sign."""

import io

import pytest

from avglab.eval.summary import histogram_figure

TYPES = ["cost in $x$ dollars", "$x^$", "between $5 and $10", "_hidden", r"\frac{a"]


@pytest.mark.parametrize("title", ["routing", "a $title$ with $"])
def test_question_types_with_dollars_draw_as_written(title):
    hist = {qtype: {"4": i, "8": 1} for i, qtype in enumerate(TYPES)}
    fig = histogram_figure(hist, title)
    fig.savefig(io.BytesIO(), format="png")  # mathtext would fail on "$x^$"
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == sorted(TYPES)  # every type, "_hidden" included
    assert not any(t.get_parse_math() for t in [*ax.get_legend().get_texts(), ax.title])
    assert ax.get_title() == title
