"""Calibration and held-out sentences for the MiniLM pruning example, built from templates.

Twelve topics, each with its own subjects, predicates, places and reasons, are combined through
templates of different shapes (short statements, questions, time and place phrases, subordinate
clauses, two-clause sentences) into English sentences of about 5 to 40 WordPiece tokens. A fixed
seed makes the sets identical on every run; the calibration and evaluation sets are disjoint
(distinct strings, checked). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import random

NUM_CALIBRATION = 600
NUM_EVALUATION = 200
SEED = 20240531

# topic -> (subjects, predicates, places, reasons); predicates are verb phrases in the past tense.
TOPICS: dict[str, tuple[tuple[str, ...], ...]] = {
    "weather": (
        ("the storm", "a cold front", "the morning fog", "heavy rain", "the heat wave",
         "a sudden hailstorm"),
        ("flooded the lower streets", "delayed every flight", "knocked out the power lines",
         "cleared up by noon", "lasted for three days", "ruined the harvest",
         "closed the mountain pass", "surprised the forecasters"),
        ("along the coast", "in the northern valleys", "over the city", "near the airport",
         "across the plains"),
        ("the pressure dropped quickly", "warm air met the colder sea",
         "the wind changed direction overnight", "the jet stream moved south"),
    ),
    "sports": (
        ("the home team", "our goalkeeper", "the young striker", "the veteran coach",
         "the cycling club", "the national relay squad"),
        ("won the final on penalties", "trained twice a day", "broke the national record",
         "lost the opening match", "signed a new contract", "scored in the last minute",
         "changed the starting lineup", "celebrated with the fans"),
        ("at the old stadium", "in front of a sold-out crowd", "on the indoor track",
         "during the away game", "at the summer tournament"),
        ("the defence had been reorganised", "the captain was injured",
         "the weather favoured the visitors", "months of hard practice paid off"),
    ),
    "cooking": (
        ("my grandmother", "the chef", "the bakery next door", "our neighbour",
         "the street vendor", "a first-year cooking student"),
        ("baked fresh bread", "made a spicy lentil soup", "burned the garlic",
         "served grilled fish with lemon", "tried a new pasta recipe", "roasted vegetables slowly",
         "forgot to add salt", "prepared dinner for twenty guests"),
        ("in the tiny kitchen", "at the weekend market", "over an open fire",
         "in the restaurant downstairs", "for the village festival"),
        ("the oven heats unevenly", "the tomatoes were perfectly ripe",
         "the guests arrived early", "the recipe was written in a hurry"),
    ),
    "science": (
        ("the research team", "a graduate student", "the telescope", "the new microscope",
         "the chemistry lab", "an international consortium"),
        ("detected a faint signal", "published the results", "measured the reaction rate",
         "repeated the experiment", "discovered a new species of beetle",
         "mapped the ocean floor", "found an error in the data", "confirmed the prediction"),
        ("in the southern observatory", "at the university", "deep in the rainforest",
         "aboard the research vessel", "in a clean room"),
        ("the instrument had been recalibrated", "the samples were contaminated",
         "the funding was renewed", "the model predicted something unexpected"),
    ),
    "finance": (
        ("the central bank", "the stock market", "a small startup", "the pension fund",
         "local shop owners", "the finance minister"),
        ("raised interest rates", "fell sharply on Monday", "secured new investors",
         "reported record profits", "cut its budget", "paid off the loan early",
         "warned about inflation", "doubled its revenue"),
        ("in the first quarter", "after the announcement", "across the region",
         "on the trading floor", "despite the recession"),
        ("consumer spending slowed down", "energy prices kept rising",
         "exports recovered", "investors feared a downturn"),
    ),
    "travel": (
        ("the tourists", "my sister", "the overnight train", "a group of hikers",
         "the ferry", "an elderly couple"),
        ("missed the last connection", "arrived two hours late", "booked a room by the sea",
         "got lost in the old town", "crossed the border at dawn", "visited the famous cathedral",
         "took hundreds of photos", "changed their plans at the last moment"),
        ("in a small mountain village", "at the central station", "on a remote island",
         "near the harbour", "along the river"),
        ("the road was closed", "the guidebook was out of date", "the tickets were cheaper",
         "a strike stopped all trains"),
    ),
    "technology": (
        ("the software update", "our server", "the new phone", "a security researcher",
         "the database", "the open source project"),
        ("crashed during the demo", "fixed a critical bug", "leaked user passwords",
         "doubled the battery life", "ran out of disk space", "released version two",
         "slowed down every request", "switched to a faster compiler"),
        ("in the data centre", "on thousands of laptops", "in the test environment",
         "during the night shift", "on the production cluster"),
        ("a cache was misconfigured", "the memory limit was too low",
         "a dependency changed its interface", "the traffic suddenly tripled"),
    ),
    "health": (
        ("the doctor", "the nurse", "a new vaccine", "my uncle", "the local clinic",
         "the physiotherapist"),
        ("recommended more sleep", "treated dozens of patients", "reduced hospital visits",
         "started running every morning", "prescribed a mild painkiller",
         "opened a second ward", "checked his blood pressure", "explained the side effects"),
        ("at the hospital", "in the rural district", "during the flu season",
         "in the waiting room", "after the operation"),
        ("the symptoms got worse", "the trial results were encouraging",
         "the staff had been trained", "the winter was unusually long"),
    ),
    "history": (
        ("the ancient city", "the emperor", "medieval monks", "the rebel army",
         "the merchants of Venice", "the first printing press"),
        ("collapsed after a long siege", "built a stone bridge", "copied rare manuscripts",
         "signed a peace treaty", "controlled the spice trade", "spread new ideas quickly",
         "moved the capital", "survived a great fire"),
        ("in the twelfth century", "along the silk road", "near the river delta",
         "in the northern provinces", "before the revolution"),
        ("the harvest failed for years", "the trade routes shifted",
         "a new dynasty came to power", "the walls were finally breached"),
    ),
    "music": (
        ("the orchestra", "a jazz trio", "the young pianist", "the rock band",
         "the choir", "a street musician"),
        ("played a new symphony", "recorded their second album", "cancelled the tour",
         "sang without a microphone", "improvised for an hour", "tuned every string twice",
         "won a national prize", "filled the concert hall"),
        ("at the open-air festival", "in a crowded bar", "in the cathedral",
         "on national radio", "at the school concert"),
        ("the conductor fell ill", "the acoustics were excellent",
         "the tickets sold out in minutes", "the audience demanded an encore"),
    ),
    "nature": (
        ("the wolves", "a pair of eagles", "the old oak tree", "the coral reef",
         "migrating geese", "the river otters"),
        ("returned to the forest", "built a nest on the cliff", "lost most of its leaves",
         "bleached in the warm water", "flew south early", "raised four cubs",
         "survived the drought", "disappeared from the valley"),
        ("in the national park", "along the riverbank", "on the rocky coast",
         "in the wetlands", "high in the mountains"),
        ("the winter was mild", "the water temperature rose", "hunting was banned",
         "new trees were planted"),
    ),
    "law": (
        ("the court", "the city council", "a defence lawyer", "the jury",
         "the new regulation", "the police"),
        ("rejected the appeal", "approved the building permit", "found the witness credible",
         "delayed the trial", "banned cars from the centre", "questioned the suspect",
         "changed the parking rules", "reached a unanimous verdict"),
        ("in the supreme court", "at the town hall", "after a long hearing",
         "during the election campaign", "in a closed session"),
        ("new evidence had emerged", "residents had complained for years",
         "the contract was ambiguous", "the deadline had passed"),
    ),
}

TIMES = ("yesterday", "last year", "on Sunday morning", "in the spring", "two weeks ago",
         "late at night", "earlier this month", "every summer")
OBSERVERS = ("Everyone agreed that", "Reports suggest that", "My friend told me that",
             "It is hard to believe that", "Nobody expected that", "The newspaper wrote that")

# Each template uses fields of one or two topics: S subject, P predicate, L place, R reason,
# T time, O observer; a trailing 2 takes them from a second topic.
TEMPLATES = (
    "What about {S}?",
    "{S} {P}.",
    "{S} {P} {L}.",
    "{T}, {S} {P}.",
    "{S} {P} {L} {T}.",
    "{O} {S} {P}.",
    "{S} {P} because {R}.",
    "{T}, {S} {P} {L} because {R}.",
    "{O} {S} {P} {L}, although {R}.",
    "Why do you think {S} {P} {L}?",
    "Did you hear that {S} {P} {T}?",
    "{S} {P} {L}, and {T} {S2} {P2}.",
    "While {S} {P} {L}, {S2} {P2} {L2}.",
    "{O} {S} {P} {L}, because {R}, while {S2} {P2}.",
    "After {S} {P}, {S2} {P2} {L2} because {R2}.",
    "{S} {P}; {S2} {P2}.",
)


def _cap(text: str) -> str:
  return text[0].upper() + text[1:]


def _sentence(rng: random.Random) -> str:
  names = list(TOPICS)
  first, second = rng.sample(names, 2)
  fields = {}
  for suffix, topic in (("", first), ("2", second)):
    subjects, predicates, places, reasons = TOPICS[topic]
    fields.update({"S" + suffix: rng.choice(subjects), "P" + suffix: rng.choice(predicates),
                   "L" + suffix: rng.choice(places), "R" + suffix: rng.choice(reasons)})
  fields["T"] = rng.choice(TIMES)
  fields["O"] = rng.choice(OBSERVERS)
  return _cap(rng.choice(TEMPLATES).format(**fields))


@functools.cache
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
  rng = random.Random(SEED)
  seen: dict[str, None] = {}
  while len(seen) < NUM_CALIBRATION + NUM_EVALUATION:
    seen.setdefault(_sentence(rng), None)
  pool = list(seen)
  calibration = tuple(pool[:NUM_CALIBRATION])
  evaluation = tuple(pool[NUM_CALIBRATION:])
  assert not set(calibration) & set(evaluation)
  return calibration, evaluation


def calibration_sentences() -> tuple[str, ...]:
  """The 600 calibration sentences (deterministic order)."""
  return _split()[0]


def evaluation_sentences() -> tuple[str, ...]:
  """The 200 held-out evaluation sentences, disjoint from `calibration_sentences`."""
  return _split()[1]
