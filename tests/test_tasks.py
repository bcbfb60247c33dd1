import numpy as np
import pytest

from icl import tasks
from icl.errors import UnknownTaskError


def test_suite_has_the_required_rules():
    rules = {t.rule for t in tasks.SUITE.values()}
    assert {"y = x", "y = x + 1", "y = 2x", "y = 2x + 3"} <= rules
    assert any(t.random_rule for t in tasks.SUITE.values())


@pytest.mark.parametrize("name", list(tasks.SUITE))
def test_prompts_follow_the_rule_and_spans_point_at_answers(name):
    task = tasks.get_task(name)
    prompts = tasks.make_prompts(task, n_prompts=5, k=12, seed=7)
    for p in prompts:
        assert len(set(p.xs)) == p.k  # distinct x within a prompt
        assert p.text.count("\n") == p.k
        for x, y, (a0, a1), (l0, l1) in zip(p.xs, p.ys, p.answer_spans, p.line_spans):
            assert p.text[l0:l1] == f"({x}, {y})\n"
            assert p.text[a0:a1] == f"{y})"
            if task.random_rule:
                assert task.y_min <= y <= task.y_max
            else:
                assert y == task.a * x + task.b


def test_deterministic_and_seed_sensitive():
    a = tasks.make_prompts("double-plus-3", 4, 10, seed=0)
    b = tasks.make_prompts("double-plus-3", 4, 10, seed=0)
    c = tasks.make_prompts("double-plus-3", 4, 10, seed=1)
    assert a == b
    assert tasks.prompts_digest(a) == tasks.prompts_digest(b) != tasks.prompts_digest(c)
    # Different tasks draw from different streams even with the same seed.
    assert tasks.make_prompts("identity", 1, 10, 0)[0].xs != tasks.make_prompts("double", 1, 10, 0)[0].xs


def test_random_rule_is_not_a_function_of_x():
    prompts = tasks.make_prompts("random", 50, 20, seed=0)
    xs = np.concatenate([p.xs for p in prompts])
    ys = np.concatenate([p.ys for p in prompts])
    assert abs(np.corrcoef(xs, ys)[0, 1]) < 0.1


def test_errors():
    with pytest.raises(UnknownTaskError, match="unknown task 'triple'.*affine:A,B"):
        tasks.get_task("triple")
    for bad in ("affine:3", "affine:3,x", "affine:1000,0", "affine:1,1000", "affine3,1"):
        with pytest.raises(UnknownTaskError):
            tasks.get_task(bad)
    with pytest.raises(ValueError):
        tasks.make_prompts("identity", 1, 100, 0)
    with pytest.raises(ValueError):
        tasks.make_prompts("identity", 0, 5, 0)


def test_affine_rule_is_named_by_its_definition():
    task = tasks.get_task("affine:3,1")
    assert (task.name, task.a, task.b, task.rule) == ("affine:3,1", 3, 1, "y = 3x + 1")
    assert tasks.canonical_name("affine: +3, 01") == "affine:3,1"
    assert tasks.get_task("affine:-1,-5").rule == "y = -x - 5" and tasks.get_task("affine:0,7").rule == "y = 7"
    for p in tasks.make_prompts("affine:3,1", 3, 10, seed=0):
        assert all(y == 3 * x + 1 for x, y in zip(p.xs, p.ys))
    # Prompts (and so cache keys) follow the definition: the same spec gives the same prompts, another
    # rule other ones, and a rule equal to a suite task's is still its own stream.
    same = tasks.make_prompts(tasks.canonical_name("affine:+3,01"), 3, 10, seed=0)
    assert same == tasks.make_prompts("affine:3,1", 3, 10, seed=0)
    assert tasks.suite_digest({"affine:3,1": same}) != tasks.suite_digest(
        {"affine:3,2": tasks.make_prompts("affine:3,2", 3, 10, seed=0)})


def test_split_names_keeps_the_comma_of_an_affine_spec():
    assert tasks.split_names("identity,affine:3,1,double") == ("identity", "affine:3,1", "double")
    assert tasks.split_names("affine:-2, 5") == ("affine:-2, 5",)
    assert tasks.split_names("") == () and tasks.split_names("plus-1") == ("plus-1",)


def test_shuffled_answers_keep_the_marginal_and_break_every_pair():
    from icl import tasks

    prompts = tasks.make_prompts("double-plus-3", 20, 12, 0)
    control = tasks.shuffled_answers(prompts, 0)
    assert control == tasks.shuffled_answers(prompts, 0)  # deterministic
    for p, c in zip(prompts, control):
        assert c.xs == p.xs and sorted(c.ys) == sorted(p.ys)
        assert all(y != 2 * x + 3 for x, y in zip(c.xs, c.ys))  # a derangement: no pair follows the rule
        assert c.task == "shuffled:double-plus-3"
        for (a, b), y in zip(c.answer_spans, c.ys):
            assert c.text[a:b] == f"{y})"


def test_answer_support_and_carries():
    import numpy as np

    from icl import tasks

    assert tasks.answer_support("double-plus-3") == 99 and tasks.answer_support("random") == 197
    assert tasks.answer_support("identity") == 99
    assert tasks.carries("plus-1", np.array([9, 19, 10, 98])).tolist() == [True, True, False, False]
    assert tasks.carries("plus-10", np.array([9, 19])).tolist() == [False, False]
    assert tasks.carries("double", np.array([9])) is None and tasks.carries("random", np.array([9])) is None
