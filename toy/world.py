"""Meeting records of the toy world: what was said, as structured data (the ground truth).

A `Meeting` is the record a spoken meeting is rendered from (toy/dialogue.py) and that the
oracle judge (toy/oracle.py) scores summaries against: participants, agenda topics, and per
topic one decision, at most one figure and at most one action item (owner, task, deadline),
plus one line of small talk. Everything is drawn from the closed pools below, so the set of
entities a summary could name is known: `ENTITY_POOLS` is the universe the oracle uses to spot
hallucinations (an entity of the universe that this meeting does not contain).

Pool choices: names are not English words ("Will", "Mark", "May" are left out) and numbers are
written as plain digits without separators, so matching after normalisation is exact; tasks
and decisions are short key phrases that a reference states verbatim.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

NAMES = (
    "Alice", "Bruno", "Chloe", "Diego", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Keiko", "Liam", "Maya", "Nadia", "Omar", "Priya", "Rosa", "Sven", "Tara", "Vera",
    "Yusuf", "Zoe", "Lucas", "Anika",
)

# topic -> (decisions, figure (what, unit, low, high, step))
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, str, int, int, int]]] = {
    "the budget": (("cut the travel costs", "freeze new hiring", "move funds to marketing"),
                   ("the remaining budget", "euros", 1000, 9000, 500)),
    "the website": (("add a search bar", "drop the blog page", "switch to a dark theme"),
                    ("the weekly visitors", "visitors", 200, 5000, 100)),
    "the product launch": (("delay the launch", "launch in two cities first", "hire an event agency"),
                           ("the expected sales", "units", 100, 2000, 50)),
    "the customer survey": (("shorten the survey", "offer a gift card", "ask about pricing"),
                            ("the response rate", "percent", 10, 90, 5)),
    "the office move": (("rent the smaller office", "keep the old desks", "move in the summer"),
                        ("the monthly rent", "euros", 1500, 6000, 250)),
    "the mobile app": (("fix the login bug first", "remove the dark mode", "support offline use"),
                       ("the crash rate", "percent", 1, 20, 1)),
    "the hiring plan": (("hire two engineers", "use a recruiting firm", "open an intern program"),
                        ("the open positions", "positions", 2, 12, 1)),
    "the training day": (("book an outside trainer", "hold it online", "make it a full day"),
                         ("the number of attendees", "attendees", 10, 80, 5)),
    "the supplier contract": (("renew the contract", "ask for a discount", "look for a second supplier"),
                              ("the price increase", "percent", 2, 25, 1)),
    "the newsletter": (("send it every month", "add a video section", "stop the print edition"),
                       ("the subscribers", "subscribers", 300, 9000, 100)),
    "the security audit": (("change all passwords", "buy a new firewall", "train the staff"),
                           ("the open issues", "issues", 3, 40, 1)),
    "the team offsite": (("go to the mountains", "keep it to one night", "invite the partners"),
                         ("the cost per person", "euros", 100, 900, 50)),
}

TASKS = (
    "send the draft", "book the venue", "update the slides", "call the supplier", "write the test plan",
    "check the contract", "prepare the demo", "order the samples", "share the minutes", "review the design",
    "collect the quotes", "draft the press release", "set up the meeting room", "clean up the database",
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
MONTHS = ("March", "April", "June", "July", "October", "November")  # "May" is left out: an English word
CITIES = ("Lisbon", "Oslo", "Vienna", "Dublin", "Prague", "Madrid", "Seoul", "Toronto")
SMALL_TALK = (  # {city}: where someone just came back from
    "I just came back from {city} and I am still tired",
    "my train from {city} was late again this morning",
    "the coffee in {city} was much better than ours",
)

# The universe of entities a summary could name; numbers (any digit run) are entities too.
ENTITY_POOLS: dict[str, tuple[str, ...]] = {
    "name": NAMES,
    "topic": tuple(TOPICS),
    "decision": tuple(d for decisions, _ in TOPICS.values() for d in decisions),
    "task": TASKS,
    "weekday": WEEKDAYS,
    "month": MONTHS,
    "city": CITIES,
}


@dataclass(frozen=True)
class Action:
    owner: str
    task: str
    deadline: str  # "Friday" or "March 14"


@dataclass(frozen=True)
class Figure:
    what: str  # "the remaining budget"
    value: int
    unit: str  # "euros"

    @property
    def text(self) -> str:
        return f"{self.value} {self.unit}"


@dataclass(frozen=True)
class Topic:
    name: str
    decision: str
    figure: Figure | None
    action: Action | None


@dataclass(frozen=True)
class Meeting:
    id: str
    participants: tuple[str, ...]  # 2-4; participants[0] chairs
    topics: tuple[Topic, ...]  # in agenda order
    small_talk: str  # filled in, e.g. "my train from Oslo was late again this morning"
    small_talk_by: str
    city: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def actions(self) -> list[Action]:
        return [topic.action for topic in self.topics if topic.action is not None]

    @property
    def figures(self) -> list[Figure]:
        return [topic.figure for topic in self.topics if topic.figure is not None]

    def entities(self) -> set[str]:
        """Every entity of the universe that occurs in this meeting (as written, not normalised)."""
        found = {*self.participants, self.city}
        for topic in self.topics:
            found.update((topic.name, topic.decision))
            if topic.figure:
                found.add(str(topic.figure.value))
            if topic.action:
                found.update((topic.action.owner, topic.action.task, *topic.action.deadline.split()))
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(record: dict[str, Any]) -> "Meeting":
        topics = tuple(
            Topic(name=t["name"], decision=t["decision"],
                  figure=Figure(**t["figure"]) if t.get("figure") else None,
                  action=Action(**t["action"]) if t.get("action") else None)
            for t in record["topics"]
        )
        return Meeting(id=record["id"], participants=tuple(record["participants"]), topics=topics,
                       small_talk=record["small_talk"], small_talk_by=record["small_talk_by"],
                       city=record["city"], extra=dict(record.get("extra", {})))


def sample_meeting(rng: random.Random, meeting_id: str) -> Meeting:
    """One meeting: 2-4 participants, 1-3 topics; each topic has a figure with probability 0.6 and
    an action item with probability 0.7 (at least one per meeting, at most one per participant,
    so every owner has one task), distinct tasks."""
    participants = tuple(rng.sample(NAMES, rng.choice((2, 3, 3, 4))))
    names = rng.sample(list(TOPICS), rng.choice((1, 2, 2, 3)))
    tasks = rng.sample(TASKS, len(names))
    with_action = [rng.random() < 0.7 for _ in names]
    if not any(with_action):
        with_action[rng.randrange(len(names))] = True
    while sum(with_action) > len(participants):  # one action item per person at most
        with_action[with_action.index(True)] = False
    owners = iter(rng.sample(participants, sum(with_action)))
    topics = []
    for name, task, has_action in zip(names, tasks, with_action):
        decisions, (what, unit, low, high, step) = TOPICS[name]
        figure = Figure(what, rng.randrange(low, high + 1, step), unit) if rng.random() < 0.6 else None
        action = None
        if has_action:
            deadline = rng.choice(WEEKDAYS) if rng.random() < 0.6 else f"{rng.choice(MONTHS)} {rng.randint(2, 28)}"
            action = Action(owner=next(owners), task=task, deadline=deadline)
        topics.append(Topic(name=name, decision=rng.choice(decisions), figure=figure, action=action))
    city = rng.choice(CITIES)
    return Meeting(id=meeting_id, participants=participants, topics=tuple(topics),
                   small_talk=rng.choice(SMALL_TALK).format(city=city), small_talk_by=rng.choice(participants),
                   city=city)
