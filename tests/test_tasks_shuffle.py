"""Prompts built from given pairs and shuffled-answer prompts."""

from icl import tasks


def test_prompt_from_matches_make_prompts():
    for p in tasks.make_prompts("double", 3, 4, seed=1):
        q = tasks.prompt_from("double", p.xs, p.ys)
        assert q == p


def test_shuffled_answers_keep_the_numbers_and_lose_the_rule():
    prompts = tasks.make_prompts("plus-1", 20, 6, seed=0)
    for keep_last in (False, True):
        shuffled = tasks.shuffle_answers(prompts, seed=0, keep_last=keep_last)
        for p, s in zip(prompts, shuffled):
            assert s.xs == p.xs and sorted(s.ys) == sorted(p.ys)
            m = p.k - 1 if keep_last else p.k
            assert all(s.ys[i] != p.ys[i] for i in range(m))  # no answer stays with its own x
            if keep_last:
                assert s.ys[-1] == p.ys[-1]
        assert shuffled == tasks.shuffle_answers(prompts, seed=0, keep_last=keep_last)
    assert tasks.shuffle_answers(prompts, 0, name="shuffled")[0].task == "shuffled"
