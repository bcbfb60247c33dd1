"""The claims ledger: every claim the book tests, in one place.

The book is organised around thirteen claims taken from blog posts, notes and lecture notes on
in-context learning. Each one is tested in a chapter, against a test declared there before its result,
and gets a verdict on the models this book runs (SmolLM2-135M-Instruct for claims about pretrained
models, small models trained here for claims about training, exact computations for the theory).

This module holds what is said about a claim in more than one place: its wording, its source, the
section with its evidence, its verdict, and what running Meta-Llama-3-8B would settle. The preface
shows it as a table and Appendix A as the full ledger, so the two can never disagree. Most verdicts
are fixed phrases written by hand after reading the chapter's tests; those of C6 and C10-C13 are the
words that the chapters' declared tests return (:func:`icl.verdicts.task_vector_verdicts`,
:func:`icl.experiments.induction_ablation.verdict`), so they are computed from the same cache entries
here. The evidence, with its numbers, stays in Appendix A, where it is written around the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Claim:
    id: str  # "C1"
    claim: str  # the claim, in the book's words (markdown, may hold TeX)
    source: str  # Pandoc citation keys, e.g. "@kunnavakkam2024update"
    section: str  # the chapter section with the verdict, e.g. "sec-surprisal-verdict"
    verdict: str | None  # None: computed by the chapter's declared test (:func:`verdicts`)
    llama: str  # what running the same experiment on Meta-Llama-3-8B would settle


CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "Surprisal falls to near zero when a task is learnable; otherwise the total information diverges",
          "@kunnavakkam2024update", "sec-surprisal-verdict", "holds at the ends, fails for $y = x+1$",
          "whether the post's own rule, $2x+3$, is learnt, and whether carries still cost"),
    Claim("C2", "The probability of the rule follows a two-hypothesis Bayesian update with constant evidence per example",
          "@kunnavakkam2024update", "sec-bayes-summary", "not supported in its strong form",
          "whether a larger model's evidence per example comes close to an ideal learner's"),
    Claim("C3", "An integer answer is fixed late (after layer 20 of 32 in llama-3-8b)",
          "@kunnavakkam2024update", "sec-lens-verdict", "holds qualitatively, later than in the notes",
          "the claim as stated: it is about that model's layers"),
    Claim("C4", "Patching a middle-layer residual from the context run makes the no-context run do ≈ 2x",
          "@kunnavakkam2024redundant", "sec-patching-verdict", "not reproduced",
          "the claim as stated, on the post's model and rule, across many prompt pairs"),
    Claim("C5", "Ablating the task-forming layers leaves the answer intact; backup heads take over and the first "
                "working patch layer moves later",
          "@kunnavakkam2024redundant", "sec-ablation-verdict", "not reproduced",
          "the claim as stated: redundancy may need a larger model"),
    Claim("C6", "Induction heads exist and attend from an answer to earlier examples; in-context learning runs through them",
          "@olsson2022induction; @kunnavakkam2024redundant", "sec-induction-verdict", None,
          "whether a larger model's induction heads carry more of its in-context learning"),
    Claim("C7", "In-context learning arrives with induction heads in a phase change during training",
          "@olsson2022induction", "sec-pc-verdict", "holds (models trained here)",
          "nothing: a claim about training, tested on models trained here"),
    Claim("C8", "In-context prediction is generally not a small weight update, except in special cases",
          "@slt20icl", "sec-c2w-verdict", "holds in a narrow sense",
          "whether fine-tuning two middle MLPs reproduces the in-context prediction at 8B"),
    Claim("C9", r"$F_n \approx nL_n + \lambda \log n$ with $\lambda < d/2$ for singular models",
          "@slt20icl; @watanabe2009algebraic", "sec-slt-verdict",
          "holds, with a correction; the phase-change LLC is not a learning coefficient",
          "nothing: theory, checked exactly and on models trained here"),
    Claim("C10", "In each example one head attends from $x$ to $y$ and brings $x$ to $y$'s position; it is likely an "
                 "induction head",
          "@kunnavakkam2024redundant", "sec-taskvec-verdict", None,
          "the post's own heads, by name, on its model"),
    Claim("C11", "A transformation feature built from the examples is carried into the query",
          "@kunnavakkam2024redundant", "sec-taskvec-verdict", None,
          "whether one vector per rule installs the rule in a larger model"),
    Claim("C12", "The query carries $j$ times the feature after $j$ examples: a constant amount per example",
          "@kunnavakkam2024update", "sec-taskvec-verdict", None,
          "the growth of the feature where the rule is learnt well"),
    Claim("C13", "Integer-ness is another in-context feature, carried by the named heads",
          "@kunnavakkam2024update", "sec-taskvec-verdict", None,
          "the post's heads, by name, where integer-ness is not already near certain"),
)


def computed_verdicts(book: Any, tv: dict[str, Any] | None = None) -> dict[str, str]:
    """The verdict words of C6 and C10-C13, from the tests the chapters declare (same cache entries).
    ``tv``: :func:`icl.verdicts.task_vector_verdicts` of those entries, if the caller already has it
    (it takes about two seconds)."""
    from icl.experiments.induction_ablation import verdict as ia_verdict
    from icl.verdicts import task_vector_verdicts

    if tv is None:
        tv = task_vector_verdicts(book.load("task_vectors"), book.load("function_vectors"),
                                  book.load("induction_heads"), book.load("ablation"))
    ia = ia_verdict(book.load("induction_ablation").data)
    return {"C6": f"exist and attend: holds; in-context learning runs through them: {ia['strong']}",
            "C10": tv["c10"], "C11": tv["c11"], "C12": tv["c12"], "C13": tv["c13"]}


def verdicts(book: Any, tv: dict[str, Any] | None = None) -> dict[str, str]:
    """Every claim's verdict, by id (``tv`` as in :func:`computed_verdicts`)."""
    computed = computed_verdicts(book, tv)
    return {c.id: c.verdict if c.verdict is not None else computed[c.id] for c in CLAIMS}


def summary_table(v: dict[str, str]) -> Any:
    """The preface's table from the verdicts ``v`` (:func:`verdicts`): each claim with its source and
    the section holding its evidence, its verdict on the models run here, and what llama-3-8b would
    settle (a markdown table, :func:`icl.book.table`)."""
    from icl.book import table

    return table([{"claim (source; evidence)": f"**{c.id}** {c.claim} [{c.source}]; @{c.section}",
                   "verdict here": v[c.id], "what llama-3-8b would settle": c.llama} for c in CLAIMS])
