"""Questions and answers from a scene's symbolic form: the paper's three instruction types.

- brief captions (stage 1): a "describe briefly" question drawn from a list, a one-line caption;
- conversation: several turns about colours, counts, shapes, sizes, positions and relative
  positions, asked only where the answer is definite (a referred object is unique); a relative
  position names both objects' rows or columns before its yes or no;
- detailed description: a "describe in detail" question, every object with size, colour,
  shape and position;
- complex reasoning: answers that take a few steps (counting after removal, comparing counts,
  extremes, counting relative to an object), with the steps spelled out as LLaVA's are.

Every generator takes a `random.Random`, so the data set is a pure function of the seed.
"""

from __future__ import annotations

import random
from collections import Counter

from .world import COLORS, COLS, ROWS, SHAPES, Scene, SceneObject

BRIEF_QUESTIONS = [
    "Describe the image briefly.",
    "Give a short description of the picture.",
    "What does this image show, in a few words?",
    "Summarize the picture in one sentence.",
    "Write a brief caption for this image.",
    "Tell me briefly what is in the image.",
    "Provide a one-line summary of the image.",
    "What is in this picture? Keep it short.",
]

DETAIL_QUESTIONS = [
    "Describe the image in detail.",
    "Give a detailed description of everything in the picture.",
    "Describe every object in this image and where it is.",
    "Walk me through the contents of the image in detail.",
    "What is in this image? Please be thorough.",
    "Write a detailed description of the picture.",
]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def there_are(n: int, word: str) -> str:
    if n == 0:
        return f"there are no {word}es" if word.endswith("s") else f"there are no {word}s"
    return f"there is {plural(n, word)}" if n == 1 else f"there are {plural(n, word)}"


def at_position(pos: str) -> str:
    return f"at the {pos}"


def describe(obj: SceneObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


def reference(scene: Scene, obj: SceneObject, rng: random.Random, avoid: str = "") -> str | None:
    """The shortest unambiguous way to name obj ("circle", "red object", "red circle",
    "large red circle"), never using the attribute in `avoid`; None if there is none."""
    objs = scene.objects
    options = []
    if avoid != "shape" and sum(o.shape == obj.shape for o in objs) == 1:
        options.append(obj.shape)
    if avoid != "color" and sum(o.color == obj.color for o in objs) == 1:
        options.append(f"{obj.color} object")
    if avoid not in ("color", "shape") and sum(o.name == obj.name for o in objs) == 1:
        options.append(obj.name)
    if avoid == "color" and sum((o.shape, o.size) == (obj.shape, obj.size) for o in objs) == 1:
        options.append(f"{obj.size} {obj.shape}")
    if avoid not in ("color", "shape", "size") and sum(
        (o.name, o.size) == (obj.name, obj.size) for o in objs
    ) == 1:
        options.append(describe(obj))
    return options[0] if options else None


def brief_caption(scene: Scene) -> str:
    names = [f"a {describe(o)}" for o in scene.reading_order()]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


def detailed_description(scene: Scene) -> str:
    n = len(scene.objects)
    parts = [f"The image shows {plural(n, 'object')} on a {scene.background} background."]
    for o in scene.reading_order():
        parts.append(f"At the {o.position} there is a {describe(o)}.")
    return " ".join(parts)


def detail_question(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One turn: a "describe in detail" question drawn from DETAIL_QUESTIONS and the scene's description."""
    return [(rng.choice(DETAIL_QUESTIONS), detailed_description(scene))]


# ----------------------------------------------------------------------------- conversation


def q_count_all(scene, rng):
    n = len(scene.objects)
    return "How many objects are there in the image?", f"{there_are(n, 'object').capitalize()}."


def q_color_of(scene, rng):
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, rng, avoid="color")
    if ref is None:
        return None
    return f"What color is the {ref}?", f"The {ref} is {obj.color}."


def q_shape_of(scene, rng):
    obj = rng.choice(scene.objects)
    if sum(o.color == obj.color for o in scene.objects) != 1:
        return None
    return f"What shape is the {obj.color} object?", f"The {obj.color} object is a {obj.shape}."


def q_where(scene, rng):
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, rng)
    if ref is None:
        return None
    return f"Where is the {ref}?", f"The {ref} is {at_position(obj.position)}."


def q_count_color(scene, rng):
    color = rng.choice(sorted({o.color for o in scene.objects}) + [rng.choice(list(COLORS))])
    k = sum(o.color == color for o in scene.objects)
    return f"How many {color} objects are there?", f"{there_are(k, color + ' object').capitalize()}."


def q_count_shape(scene, rng):
    shape = rng.choice(sorted({o.shape for o in scene.objects}) + [rng.choice(SHAPES)])
    k = sum(o.shape == shape for o in scene.objects)
    return f"How many {shape}s are there?", f"{there_are(k, shape).capitalize()}."


def q_exists(scene, rng):
    if rng.random() < 0.5:
        o = rng.choice(scene.objects)
        color, shape = o.color, o.shape
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    present = any(o.color == color and o.shape == shape for o in scene.objects)
    answer = f"Yes, there is a {color} {shape}." if present else f"No, there is no {color} {shape}."
    return f"Is there a {color} {shape} in the image?", answer


def q_size_of(scene, rng):
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, rng, avoid="size")
    if ref is None:
        return None
    return f"Is the {ref} large or small?", f"The {ref} is {obj.size}."


def q_relative(scene, rng, steps: bool = True):
    if len(scene.objects) < 2:
        return None
    a, b = rng.sample(scene.objects, 2)
    ra, rb = reference(scene, a, rng), reference(scene, b, rng)
    if ra is None or rb is None:
        return None
    if a.col != b.col and (a.row == b.row or rng.random() < 0.5):
        q = f"Is the {ra} to the left of the {rb}?"
        verdict = f"yes, the {ra} is to the left of" if a.col < b.col else f"no, the {ra} is to the right of"
    else:
        q = f"Is the {ra} above the {rb}?"
        verdict = f"yes, the {ra} is above" if a.row < b.row else f"no, the {ra} is below"
    if not steps:
        return q, f"{verdict[0].upper()}{verdict[1:]} the {rb}."
    # The rows or columns before the verdict: a bare yes/no decides on its first word, before either place
    # is written, and stayed near chance (51-57%); after "top row ... middle row" the verdict compares two
    # words (docs/REPRODUCTION.md, "Steps in stage 2's answers: two whole runs").
    if q.endswith(f"to the left of the {rb}?"):
        where_a, where_b = f"in the {COLS[a.col]} column", f"in the {COLS[b.col]} column"
    else:
        where_a, where_b = f"in the {ROWS[a.row]} row", f"in the {ROWS[b.row]} row"
    return q, f"The {ra} is {where_a} and the {rb} is {where_b}, so {verdict} the {rb}."


def q_relative_short(scene, rng):
    """The bare yes/no form, for the short-question phase: its questions teach single lookups."""
    return q_relative(scene, rng, steps=False)


CONVERSATION = [q_count_all, q_color_of, q_shape_of, q_where, q_count_color, q_count_shape, q_exists, q_size_of,
                q_relative]
SHORT = [q_relative_short if form is q_relative else form for form in CONVERSATION]  # the phase's forms


def draw(forms: list, scene: Scene, rng: random.Random, turns: int, tries: int) -> list[tuple[str, str]]:
    """Up to `turns` distinct questions, each from a form drawn at random; `tries` draws in all."""
    qa, seen = [], set()
    for _ in range(tries):
        if len(qa) == turns:
            break
        made = rng.choice(forms)(scene, rng)
        if made is not None and made[0] not in seen:
            seen.add(made[0])
            qa.append(made)
    return qa


def conversation(scene: Scene, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    return draw(CONVERSATION, scene, rng, turns, tries=turns * 6)




# ----------------------------------------------------------------------------- reasoning


def r_remove_color(scene, rng):
    color = rng.choice([o.color for o in scene.objects])
    n, k = len(scene.objects), sum(o.color == color for o in scene.objects)
    verb = "is" if k == 1 else "are"
    return (
        f"If all the {color} objects were taken away, how many objects would be left?",
        f"There {'is' if n == 1 else 'are'} {plural(n, 'object')} and {k} of them {verb} {color}, "
        f"so {plural(n - k, 'object')} would be left.",
    )


def r_compare_shapes(scene, rng):
    counts = Counter(o.shape for o in scene.objects)
    s1, s2 = rng.sample(SHAPES, 2)
    c1, c2 = counts[s1], counts[s2]
    if c1 + c2 == 0:
        return None
    verdict = "yes" if c1 > c2 else "no"
    return (
        f"Are there more {s1}s than {s2}s?",
        f"{there_are(c1, s1).capitalize()} and {there_are(c2, s2)}, so the answer is {verdict}.",
    )


EXTREMES = {"left": ("farthest to the left", lambda o: o.col), "right": ("farthest to the right", lambda o: -o.col),
            "top": ("highest", lambda o: o.row), "bottom": ("lowest", lambda o: -o.row)}


def r_extreme(scene, rng):
    if len(scene.objects) < 2:
        return None
    side = rng.choice(list(EXTREMES))
    phrase, key = EXTREMES[side]
    best = min(key(o) for o in scene.objects)
    winners = [o for o in scene.objects if key(o) == best]
    if len(winners) != 1:
        return None
    o = winners[0]
    q = f"What color is the object {phrase}?" if side in ("left", "right") else f"What color is the {phrase} object?"
    return q, f"The {o.size} {o.shape} {at_position(o.position)} is {phrase}, so the answer is {o.color}."


def r_count_left_of(scene, rng):
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, rng)
    if ref is None:
        return None
    side = rng.choice(["left", "right"])
    cols = range(obj.col) if side == "left" else range(obj.col + 1, len(COLS))
    # Column by column, then the sum: a count over one column is a lookup like "how many COLOR objects?";
    # the bare count over the whole side was often "no objects" (docs/REPRODUCTION.md, "Steps in stage 2's
    # answers").
    per_col = [sum(o.col == c for o in scene.objects) for c in cols]
    steps = " and ".join(f"{there_are(k, 'object') if i == 0 else k or 'none'} in the {COLS[c]} column"
                         for i, (c, k) in enumerate(zip(cols, per_col)))
    total = there_are(sum(per_col), "object")
    return (
        f"How many objects are to the {side} of the {ref}?",
        f"The {ref} is {at_position(obj.position)}, and {steps}, so {total} to its {side}." if per_col
        else f"The {ref} is {at_position(obj.position)}, so {total} to its {side}.",
    )


def r_same_color(scene, rng):
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, rng, avoid="color")
    if ref is None:
        return None
    n = sum(o.color == obj.color for o in scene.objects)
    # The count of that colour first, then one less: "how many COLOR objects?" is a lookup the model does
    # well; the bare "k other objects" answer stayed at its most common value, no other (docs/REPRODUCTION.md).
    return (
        f"How many other objects have the same color as the {ref}?",
        f"The {ref} is {obj.color}, and {there_are(n, f'{obj.color} object')}, so "
        f"{there_are(n - 1, 'other object')} of that color.",
    )


REASONING = [r_remove_color, r_compare_shapes, r_extreme, r_count_left_of, r_same_color]


def reasoning(scene: Scene, rng: random.Random, turns: int = 1) -> list[tuple[str, str]]:
    return draw(REASONING, scene, rng, turns, tries=turns * 10)


def reasoning_pass_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Three or four reasoning questions and two conversation questions, fresh draws in a random order, for
    the reasoning pass that closes stage 2 (trainer/recipe.py); the conversation turns keep those forms."""
    qa = reasoning(scene, rng, turns=rng.randint(3, 4)) + conversation(scene, rng, 2)
    rng.shuffle(qa)
    return qa


def short_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One question of every conversation form that has a definite answer in this scene (relations as a
    bare yes/no)."""
    return [qa for form in SHORT if (qa := form(scene, rng)) is not None]
