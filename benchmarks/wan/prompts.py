"""Prompts for the speculative-decoding benchmark (benchmarks/wan/speculate.py, issue 18).

Two kinds:

    grounded   rewrite, extract, summarise, edit code: each carries a passage (40-120 words)
               or a code snippet, and the answer should reuse its text, which is where
               prompt-lookup (n-gram) drafts can be right
    chat       open-ended requests with nothing to copy: drafts should mostly miss

The model is SmolLM2-135M-Instruct, so the instructions are short, explicit and invite copying.
The set is fixed: results at different times and delays compare prompt by prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

KINDS = ("grounded", "chat")


@dataclass(frozen=True)
class Prompt:
    kind: str  # "grounded" or "chat"
    name: str  # short, unique, for tables
    text: str


def _g(name: str, instruction: str, passage: str) -> Prompt:
    return Prompt("grounded", name, f"{instruction}\n\n{passage.strip()}")


def _c(name: str, text: str) -> Prompt:
    return Prompt("chat", name, text)


_HARBOUR = """\
The old harbour of Port Ellen was built in 1832. It had three piers and a small lighthouse.
By 1900 about 40 fishing boats worked from the harbour, and 12 families lived on the quay.
A storm in 1953 destroyed two of the piers. Today only 5 boats remain, and the lighthouse is
a museum that opens at 10 in the morning and closes at 4 in the afternoon."""

_GARDEN = """\
Maria waters the garden every morning. She picks the ripe tomatoes and puts them in a basket.
Her brother cuts the grass while their dog sleeps under the apple tree. In the afternoon they
sit on the bench and drink cold lemonade. When the sun goes down, Maria closes the gate and
everyone walks back to the house for dinner."""

_TRAIN = """\
The night train leaves the city at nine o'clock. Passengers find their seats and put their bags
on the racks. The conductor checks every ticket and wishes each traveller a good journey. Outside
the window, the lights of small towns pass by in the dark. Most people fall asleep before
midnight, and the train reaches the coast just after sunrise."""

_COFFEE = """\
Coffee grows best in warm places with plenty of rain. The plants need shade when they are young.
Farmers pick the red coffee cherries by hand, because the cherries do not all ripen at the same
time. The seeds inside the cherries are dried, roasted and ground. Brazil grows more coffee than
any other country, and Vietnam is second. Coffee reached Europe in the seventeenth century."""

_BEES = """\
Honey bees live in large colonies. A colony has one queen, a few hundred drones and many
thousands of workers. The workers collect nectar and pollen from flowers. They turn the nectar
into honey and store it in wax cells. In winter the bees stay inside the hive and keep warm by
moving their wing muscles. A healthy colony can make more than 25 kilograms of honey a year."""

_MEETING = """\
Hi team, the project meeting moves from Tuesday to Thursday at 3 pm. Please bring your status
reports. Anna will present the new design, and Ben will show the test results. The room is on the
second floor, next to the kitchen. If you cannot come, send your report to Anna by Wednesday
evening. Thanks, Sam"""

_RECIPE = """\
To make pancakes, mix 200 grams of flour, 2 eggs and 300 millilitres of milk in a bowl. Add a
pinch of salt and whisk until the batter is smooth. Heat a little butter in a pan. Pour in a
ladle of batter and cook for 1 minute on each side. Serve the pancakes warm with lemon and
sugar. This recipe makes 8 pancakes."""

_SOLAR = """\
The solar system has eight planets. Mercury is the closest planet to the sun, and Neptune is
the farthest. Jupiter is the largest planet, and it has more than 90 moons. Mars is called the
red planet because of the iron in its soil. Earth is the only planet known to have life. Saturn
is famous for its bright rings, which are made of ice and rock."""

_LIBRARY = """\
The town library opens at 9 am and closes at 6 pm from Monday to Friday. On Saturday it opens
at 10 am and closes at 2 pm. It is closed on Sunday. Members can borrow up to 6 books at a time
for 3 weeks. Late books cost 20 cents a day. The library also has 12 computers that anyone can
use for free for one hour."""

_SUM_BUG = '''\
def total_price(items):
    """Return the sum of price * quantity over all items."""
    total = 0
    for item in items:
        total = item["price"] * item["quantity"]
    return total'''

_MAX_BUG = '''\
def largest(numbers):
    """Return the largest number in a non-empty list."""
    best = 0
    for n in numbers:
        if n > best:
            best = n
    return best'''

_COUNT_BUG = '''\
def count_vowels(text):
    """Return how many vowels (a, e, i, o, u) the text has."""
    count = 0
    for ch in text:
        if ch in "aeiou":
            count =+ 1
    return count'''

_AVERAGE = '''\
def average(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)'''

_GREET = '''\
def greet(name, hour):
    if hour < 12:
        return "Good morning, " + name
    elif hour < 18:
        return "Good afternoon, " + name
    else:
        return "Good evening, " + name'''

_INVENTORY = '''\
class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        self.items[name] = self.items.get(name, 0) - count'''

PROMPTS: tuple[Prompt, ...] = (
    # --- grounded: rewrite ---------------------------------------------------------------------
    _g("numbers-in-words", "Repeat the following text exactly, but write every number in words.", _HARBOUR),
    _g("past-tense", "Rewrite the following text in the past tense. Keep everything else the same.", _GARDEN),
    _g("first-person", "Rewrite the following text so that Maria tells it herself, using \"I\" instead of "
       "\"Maria\" and \"she\".", _GARDEN),
    _g("future-tense", "Rewrite the following text in the future tense, starting with \"Tomorrow\".", _TRAIN),
    _g("fix-spelling", "Correct the spelling mistakes in the following text and return the whole corrected text.",
       """\
The nite train leaves the citty at nine o'clock. Pasengers find their seets and put their bags
on the racks. The conducter checks every tiket and wishes each traveler a good jurney. Outside
the windoe, the lights of small towns pass by in the dark. Most peple fall asleep befor
midnight, and the train reaches the cost just after sunrise."""),
    _g("formal-email", "Rewrite the following message in a more formal tone. Keep all the details.", _MEETING),
    _g("bullet-steps", "Rewrite the following recipe as a numbered list of steps. Use the same words.", _RECIPE),
    _g("replace-name", "Repeat the following text, but replace the name \"Anna\" with \"Laura\" everywhere.",
       _MEETING),
    # --- grounded: extract ---------------------------------------------------------------------
    _g("extract-numbers", "Extract every sentence of the following text that contains a number. "
       "Write each sentence on its own line.", _LIBRARY),
    _g("extract-planet", "Extract every sentence of the following text that mentions a planet's size or "
       "moons. Copy the sentences exactly.", _SOLAR),
    _g("extract-coffee", "Extract every sentence of the following text that mentions a country. "
       "Copy the sentences exactly.", _COFFEE),
    _g("list-names", "List every person named in the following message, with what each of them will do.",
       _MEETING),
    _g("opening-hours", "From the following text, copy the opening hours for each day of the week.", _LIBRARY),
    # --- grounded: summarise -------------------------------------------------------------------
    _g("summary-bees", "Summarise the following text in two sentences, using its own words.", _BEES),
    _g("summary-harbour", "Summarise the following text in three short sentences, using its own words.",
       _HARBOUR),
    _g("key-facts", "Write the three most important facts from the following text as a list.", _SOLAR),
    # --- grounded: code ------------------------------------------------------------------------
    _g("fix-sum", "Fix the bug in this function and return the whole function.", _SUM_BUG),
    _g("fix-max", "Fix the bug in this function (it fails on lists of negative numbers) and return the whole "
       "function.", _MAX_BUG),
    _g("fix-count", "Fix the bug in this function and return the whole function.", _COUNT_BUG),
    _g("add-docstring", "Add a docstring to this function and return the whole function.", _AVERAGE),
    _g("add-comments", "Add a comment above each line of this function and return the whole function.", _GREET),
    _g("rename-var", "Rename the variable \"total\" to \"running_sum\" in this function and return the whole "
       "function.", _AVERAGE),
    _g("add-method", "Add a method \"count(self, name)\" to this class that returns how many of an item there "
       "are. Return the whole class.", _INVENTORY),
    _g("type-hints", "Add type hints to this function and return the whole function.", _GREET),
    # --- chat ----------------------------------------------------------------------------------
    _c("lighthouse-story", "Tell me a short story about a lighthouse."),
    _c("rainy-day", "What are some fun things to do on a rainy day?"),
    _c("explain-rainbow", "Explain why we see rainbows, in simple words."),
    _c("poem-autumn", "Write a short poem about autumn."),
    _c("healthy-breakfast", "Give me three ideas for a healthy breakfast."),
    _c("learn-guitar", "How should a beginner start learning the guitar?"),
    _c("moon-trip", "Imagine you are an astronaut. Describe your first day on the moon."),
    _c("good-friend", "What makes someone a good friend?"),
    _c("city-or-country", "Is it better to live in a city or in the countryside? Give reasons."),
    _c("robot-dog", "Write a short story about a robot who wants a dog."),
)


def select(kinds: Sequence[str] = KINDS, limit: int | None = None,
           prompts: Sequence[Prompt] = PROMPTS) -> list[Prompt]:
    """The prompts of ``kinds`` (in that order of kinds, each kind in the set's order), at most
    ``limit`` of each kind. Raises ValueError for an unknown kind or a limit under 1."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown prompt kind(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(KINDS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"the limit must be at least 1, got {limit}")
    out: list[Prompt] = []
    for kind in dict.fromkeys(kinds):
        mine = [p for p in prompts if p.kind == kind]
        out += mine if limit is None else mine[:limit]
    return out


def by_name(name: str, prompts: Sequence[Prompt] = PROMPTS) -> Prompt:
    """The prompt called ``name``; KeyError if there is none."""
    for p in prompts:
        if p.name == name:
            return p
    raise KeyError(name)
