from icl.book import ci, num


def test_ci_formatting():
    assert ci([4.49, 4.21, 4.8], unit="nats") == "4.49 nats (95% CI 4.21–4.80)"
    assert ci([-0.63, -0.88, -0.39]) == "-0.63 (95% CI -0.88 to -0.39)"
    assert num(2.345, 1) == "2.3"
