"""In-context tasks and the prompts that pose them.

A task is a rule ``y = f(x)`` and a line format. A prompt is ``k`` examples of the rule, one per line::

    (28, 59)
    (86, 175)
    (13, 29)

The model reads the prompt left to right, so the answer of example ``i`` is predicted from examples
``1..i-1`` plus ``x_i``: one teacher-forced pass over the full prompt gives the prediction after every
number of examples at once. The *answer* of an example is everything the rule determines: the digits of
``y`` and the closing parenthesis (``"59)"``). With SmolLM2's tokenizer every digit is its own token, so
scoring the first token alone would score the first digit only; we always score the whole answer.

Prompts are a pure function of (task, number of prompts, k, seed): the random generator is seeded from
the seed and a hash of the task's name (not Python's salted ``hash``), so prompts are identical across
runs and machines. :func:`prompts_digest` hashes their text for the cache key.

The suite runs from a rule a small model copies at once (``y = x``) to one it does not learn at this
scale (``y = 2x + 3``, the source notes' task), with a random-rule control whose answers carry no
learnable structure at all. Any other affine rule ``y = A x + B`` is named by its definition,
``affine:A,B`` (:func:`get_task`); its name, and so its prompts and every cache key built on them,
follow from ``A`` and ``B`` alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from icl.errors import UnknownTaskError


@dataclass(frozen=True)
class Task:
    """``y = a * x + b`` on integers, or a uniformly random ``y`` when ``random_rule`` is set."""

    name: str
    a: int = 1
    b: int = 0
    random_rule: bool = False
    x_min: int = 1
    x_max: int = 99
    y_min: int | None = None  # range of a random rule's answers
    y_max: int | None = None

    @property
    def rule(self) -> str:
        if self.random_rule:
            return f"y uniform in [{self.y_min}, {self.y_max}]"
        if self.a == 0:
            return f"y = {self.b}"
        lead = "x" if self.a == 1 else "-x" if self.a == -1 else f"{self.a}x"
        return f"y = {lead}" + (f" + {self.b}" if self.b > 0 else f" - {-self.b}" if self.b < 0 else "")

    def answers(self, xs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.random_rule:
            return rng.integers(self.y_min, self.y_max + 1, size=len(xs))  # type: ignore[operator]
        return self.a * xs + self.b


# The random rule draws answers over the same range as 2x + 3 on x in 1..99, so its digits look alike.
SUITE: dict[str, Task] = {
    t.name: t
    for t in (
        Task("identity", a=1, b=0),
        Task("plus-1", a=1, b=1),
        Task("plus-10", a=1, b=10),
        Task("double", a=2, b=0),
        Task("double-plus-3", a=2, b=3),
        Task("random", random_rule=True, y_min=5, y_max=201),
    )
}
DEFAULT_TASKS = tuple(SUITE)
AFFINE_LIMIT = (99, 999)  # |A| and |B| of an affine:A,B task
_AFFINE = re.compile(r"^affine:([+-]?\d+),([+-]?\d+)$")
TASK_HELP = f"a task of the suite ({', '.join(SUITE)}) or affine:A,B (y = A x + B, integers)"


def get_task(name: str) -> Task:
    """A task of the suite by name, or the affine rule ``y = A x + B`` named ``affine:A,B``."""
    if name in SUITE:
        return SUITE[name]
    m = _AFFINE.match(name.replace(" ", ""))
    if m is None:
        raise UnknownTaskError(f"unknown task {name!r}: use {TASK_HELP}")
    a, b = int(m.group(1)), int(m.group(2))
    if abs(a) > AFFINE_LIMIT[0] or abs(b) > AFFINE_LIMIT[1]:
        raise UnknownTaskError(f"task {name!r}: affine:A,B needs |A| <= {AFFINE_LIMIT[0]} and |B| <= {AFFINE_LIMIT[1]}")
    return Task(f"affine:{a},{b}", a=a, b=b)


def canonical_name(name: str) -> str:
    """The name a task is keyed by (``affine:+3,01`` -> ``affine:3,1``); raises for an unknown task."""
    return get_task(name).name


def split_names(raw: str) -> tuple[str, ...]:
    """A comma-separated list of task names, where ``affine:A,B`` keeps its own comma."""
    return tuple(s.strip() for s in re.findall(r"\s*affine:\s*[+-]?\d+\s*,\s*[+-]?\d+|[^,]+", raw) if s.strip())


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text and, per example, the character spans of the line and of the answer."""

    task: str
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    text: str
    line_spans: tuple[tuple[int, int], ...]  # "(28, 59)\n"
    answer_spans: tuple[tuple[int, int], ...]  # "59)"

    @property
    def k(self) -> int:
        return len(self.xs)


def format_example(x: int, y: int) -> tuple[str, int]:
    """The line for one example and the offset where its answer starts."""
    head = f"({x}, "
    return f"{head}{y})\n", len(head)


def _stream_seed(seed: int, name: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")]


def make_prompts(task: Task | str, n_prompts: int, k: int, seed: int) -> list[Prompt]:
    """``n_prompts`` prompts of ``k`` examples each, with distinct x values inside a prompt."""
    task = get_task(task) if isinstance(task, str) else task
    n_x = task.x_max - task.x_min + 1
    if not 1 <= k <= n_x:
        raise ValueError(f"k must be in 1..{n_x} for task {task.name}; got {k}")
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be positive; got {n_prompts}")
    rng = np.random.default_rng(_stream_seed(seed, task.name))
    prompts = []
    for _ in range(n_prompts):
        xs = rng.choice(np.arange(task.x_min, task.x_max + 1), size=k, replace=False)
        ys = task.answers(xs, rng)
        text, lines, answers = "", [], []
        for x, y in zip(xs.tolist(), ys.tolist()):
            line, offset = format_example(x, y)
            start = len(text)
            lines.append((start, start + len(line)))
            answers.append((start + offset, start + len(line) - 1))  # digits and ")", not "\n"
            text += line
        prompts.append(Prompt(task.name, tuple(xs.tolist()), tuple(ys.tolist()), text,
                              tuple(lines), tuple(answers)))
    return prompts


def prompts_digest(prompts: list[Prompt]) -> str:
    """sha256 of the prompts' content (task, text and scored spans), for cache keys."""
    payload = [[p.task, p.text, p.answer_spans, p.line_spans] for p in prompts]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def make_suite(names: tuple[str, ...] | list[str], n_prompts: int, k: int, seed: int) -> dict[str, list[Prompt]]:
    """Prompts for several tasks at once, each from its own seeded stream."""
    return {name: make_prompts(name, n_prompts, k, seed) for name in names}


def suite_digest(prompts_by_task: dict[str, list[Prompt]]) -> str:
    """sha256 over each task's definition and prompts, in order, for cache keys of multi-task experiments."""
    h = hashlib.sha256()
    for name, prompts in prompts_by_task.items():
        h.update(f"{name}:{get_task(name)}:{prompts_digest(prompts)}".encode())
    return h.hexdigest()


def sets_digest(sets_by_task: dict[str, dict[str, list[Prompt]]]) -> str:
    """sha256 over several named prompt sets per task (``{task: {kind: prompts}}``), for cache keys of
    experiments that build more than one kind of prompt per task."""
    h = hashlib.sha256()
    for name, sets in sets_by_task.items():
        for kind, prompts in sets.items():
            h.update(f"{name}:{kind}:{prompts_digest(prompts)}".encode())
    return h.hexdigest()


def prompt_from(task: str, xs: tuple[int, ...] | list[int], ys: tuple[int, ...] | list[int]) -> Prompt:
    """The prompt with examples ``(xs[i], ys[i])`` in order, in the suite's line format, whatever rule (or
    none) links them: a zero-shot query is ``prompt_from(task, [x], [y])``, a shuffled-label prompt
    is one whose ``ys`` were permuted."""
    if len(xs) != len(ys) or not len(xs):
        raise ValueError("need as many answers as inputs, and at least one example")
    text, lines, answers = "", [], []
    for x, y in zip(xs, ys):
        line, offset = format_example(int(x), int(y))
        start = len(text)
        lines.append((start, start + len(line)))
        answers.append((start + offset, start + len(line) - 1))
        text += line
    return Prompt(task, tuple(int(x) for x in xs), tuple(int(y) for y in ys), text, tuple(lines), tuple(answers))


def shuffle_answers(prompts: list[Prompt], seed: int, keep_last: bool = False, name: str | None = None) -> list[Prompt]:
    """The same prompts with each prompt's answers permuted among its examples (a seeded stream per
    call): inputs and the set of answers stay, the rule linking them goes. ``keep_last`` keeps the
    last example (the query) right, so only the demonstrations are corrupted (Todd et al.'s
    shuffled-label prompts); ``name`` renames the task of the result."""
    rng = np.random.default_rng(_stream_seed(seed, "shuffle:" + (name or prompts[0].task if prompts else "")))
    out = []
    for p in prompts:
        m = p.k - 1 if keep_last else p.k
        order = rng.permutation(m) if m > 1 else np.arange(m)
        if m > 1:
            while (order == np.arange(m)).any():  # a derangement: no answer stays with its own x
                order = rng.permutation(m)
        ys = [p.ys[i] for i in order] + ([p.ys[-1]] if keep_last else [])
        out.append(prompt_from(name or p.task, p.xs, ys))
    return out


def shuffled_answers(prompts: list[Prompt], seed: int) -> list[Prompt]:
    """The same-marginal control of a rule (:func:`shuffle_answers` on every example, the task renamed
    ``shuffled:<task>``).

    Every prompt keeps its ``x`` values and the multiset of its answers, so the answers' digits,
    parity, range and frequencies are exactly those of the rule; only the pairing of ``y`` with ``x``
    is gone, and no example keeps its own answer. What a model gains on the rule's prompts over these
    is what the rule itself is worth to it; what it gains on these over a uniform random answer is the
    answers' marginal (for ``2x + 3``: odd numbers between 5 and 201)."""
    if not prompts:
        return []
    return shuffle_answers(prompts, seed, name=f"shuffled:{prompts[0].task}")


def answer_support(task: "Task | str") -> int:
    """How many distinct answers the task can give on its x range: ``log`` of it is the surprisal of a
    learner that knows the set of answers (and that they are equally likely) but not the rule."""
    task = get_task(task) if isinstance(task, str) else task
    if task.random_rule:
        return int(task.y_max - task.y_min + 1)  # type: ignore[operator]
    xs = np.arange(task.x_min, task.x_max + 1)
    return int(len(np.unique(task.a * xs + task.b)))


def carries(task: "Task | str", xs: np.ndarray) -> np.ndarray | None:
    """For ``y = x + b`` (``a = 1``, ``b >= 0``): whether adding ``b`` to ``x`` carries out of the units
    digit (``x`` ending in 9 for plus-1), the examples where the answer is not ``x`` with its last digit
    changed. None for other rules."""
    task = get_task(task) if isinstance(task, str) else task
    if task.random_rule or task.a != 1 or task.b < 0:
        return None
    return (np.asarray(xs) % 10 + task.b % 10) >= 10
