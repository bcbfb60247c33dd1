import numpy as np
import pytest

from icl.book import _plain_numpy_scalars, ci, math, no_negative_zero, num, table


def test_ci_formatting():
    assert ci([4.49, 4.21, 4.8], unit="nats") == "4.49 nats (95% CI 4.21–4.80)"
    assert ci([-0.63, -0.88, -0.39]) == "-0.63 (95% CI -0.88 to -0.39)"
    assert ci([0.001, -0.004, 0.01]) == "0.00 (95% CI 0.00–0.01)"  # no "-0.00", so no "to"
    assert num(2.345, 1) == "2.3"
    assert num(np.float32(-0.001)) == "0.00"


def test_no_negative_zero_only_touches_zeros():
    assert no_negative_zero("[-0.00, -0.5, -0, (-0.0), x-0.0, -0.001]") == "[0.00, -0.5, 0, (0.0), x-0.0, -0.001]"


def test_math_is_one_markdown_span():
    out = math(r"k \in \{", ", ".join(str(k) for k in np.array([1, 2])), r"\}")
    assert out.data == r"$k \in \{1, 2\}$"
    assert math(r"d = ", np.int64(4)).data == "$d = 4$"
    with pytest.raises(ValueError):
        math("$x$")


def test_table_is_a_pipe_table_without_index():
    rows = [{"model": "$a^2$", "λ": np.float64(0.5), "gap": "-0.00", "a|b": "x|y"}]
    md = table(rows).data
    assert md.splitlines()[0].split("|")[1].strip() == "model"
    assert "$a^2$" in md and "0.5" in md and "-0.00" not in md and "x\\|y" in md and "a\\|b" in md
    assert "..." not in table([{"s": "x" * 300}]).data
    with pytest.raises(ValueError):
        table([])


def test_numpy_scalars_print_as_numbers_in_a_kernel():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        _plain_numpy_scalars()
        fmt = shell.display_formatter.format
        assert fmt(np.float64(0.25))[0]["text/plain"] == "0.25"
        assert fmt(np.int64(19))[0]["text/plain"] == "19"
        assert fmt(np.bool_(True))[0]["text/plain"] == "True"
    finally:
        InteractiveShell.clear_instance()
