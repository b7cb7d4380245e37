"""Instruction families of the toy world, the facts each one asks for, and reference answers.

The paper's queries range from "summarize briefly" to structured outputs (bullets, JSON,
e-mail), "list every X", questions about a part of the recording and length limits (section
2.1). Each family here has (a) instruction phrasings in two styles ("train" for every split
but the shifted test, which uses the disjoint "shifted" phrasings), (b) `facts`: the items of
the record it asks for, each a tuple of atoms (key strings a correct answer states), (c) a
format and an optional word limit (`spec`), and (d) a reference answer rendered from the
record, the stand-in for the paper's GPT-4.1 references. The oracle judge (toy/oracle.py)
reads (b) and (c) from here, so the references and the judge cannot drift apart.

    family        params                           facts                                format   words
    brief         -                                topics, decisions, actions            prose    80
    bullets       -                                topics, decisions, figures, actions   bullets  -
    json          keys                             topics, decisions, actions            json     -
    email         -                                decisions, actions                    email    -
    list_every    what: participants|figures|      those items                           list     -
                  deadlines|topics
    who           task                             owner, deadline                       any      30
    length_limit  max_words: 15|25|40              decisions                             any      max_words
    part          topic_index, by: name|position   that topic's decision, figure, action any      -

An action is one fact with three atoms (owner, task, deadline); a figure has two (value,
unit); the others have one.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from .world import Meeting

FAMILIES = ("brief", "bullets", "json", "email", "list_every", "who", "length_limit", "part")
LIST_WHATS = ("participants", "figures", "deadlines", "topics")
JSON_KEYS = ("topics", "decisions", "action_items")
WORD_LIMITS = (15, 25, 40)
ORDINALS = ("first", "second", "third")

PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "brief": {"train": ("Summarize the meeting briefly.", "Give a short summary of this meeting."),
              "shifted": ("What's the gist of this recording, in a few sentences?",)},
    "bullets": {"train": ("Summarize the meeting as bullet points.", "List the key points of the meeting as bullets."),
                "shifted": ("Give me the main takeaways as a bulleted list.",)},
    "json": {"train": ('Summarize the meeting as JSON with the keys "topics", "decisions" and "action_items".',),
             "shifted": ('Return a JSON object describing the meeting, with keys "topics", "decisions", "action_items".',)},
    "email": {"train": ("Write the meeting summary as an e-mail to the team.",),
              "shifted": ("Draft a follow-up email to the attendees that sums up the meeting.",)},
    "list_every": {"train": ("List every {what} mentioned in the meeting.",),
                   "shifted": ("Which {what} came up in the recording? Name all of them.",)},
    "who": {"train": ("Who is responsible for the task to {task}?",),
            "shifted": ("Which person has to {task}, and by when?",)},
    "length_limit": {"train": ("Summarize the decisions of the meeting in at most {max_words} words.",),
                     "shifted": ("Keep it under {max_words} words: what did the meeting decide?",)},
    "part": {"train": ("What was decided about {topic}?", "What was decided in the {ordinal} part of the meeting?"),
             "shifted": ("Tell me what happened on {topic}.", "Sum up the {ordinal} agenda item.")},
}
LIST_LABELS = {"participants": "participant", "figures": "figure", "deadlines": "deadline", "topics": "topic"}


@dataclass(frozen=True)
class Task:
    family: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": dict(self.params)}

    @staticmethod
    def from_dict(record: dict[str, Any]) -> "Task":
        if record.get("family") not in FAMILIES:
            raise ValueError(f"unknown instruction family {record.get('family')!r}; expected one of {FAMILIES}")
        return Task(record["family"], dict(record.get("params", {})))


@dataclass(frozen=True)
class Spec:
    format: str  # prose | bullets | json | email | list | any
    max_words: int | None
    json_keys: tuple[str, ...] = ()


def spec(task: Task) -> Spec:
    """The format and word limit the instruction asks for (table in the module docstring)."""
    family = task.family
    if family == "brief":
        return Spec("prose", 80)
    if family == "bullets":
        return Spec("bullets", None)
    if family == "json":
        return Spec("json", None, tuple(task.params.get("keys", JSON_KEYS)))
    if family == "email":
        return Spec("email", None)
    if family == "list_every":
        return Spec("list", None)
    if family == "who":
        return Spec("any", 30)
    if family == "length_limit":
        return Spec("any", int(task.params["max_words"]))
    if family == "part":
        return Spec("any", None)
    raise ValueError(f"unknown instruction family {family!r}")


def facts(meeting: Meeting, task: Task) -> list[tuple[str, ...]]:
    """The record's items the instruction asks for, each a tuple of atoms (module docstring)."""
    topics = [(t.name,) for t in meeting.topics]
    decisions = [(t.decision,) for t in meeting.topics]
    figures = [(str(f.value), f.unit) for f in meeting.figures]
    actions = [(a.owner, a.task, a.deadline) for a in meeting.actions]
    family, params = task.family, task.params
    if family in ("brief", "json"):
        return topics + decisions + actions
    if family == "bullets":
        return topics + decisions + figures + actions
    if family == "email":
        return decisions + actions
    if family == "list_every":
        return {"participants": [(p,) for p in meeting.participants], "figures": figures,
                "deadlines": [(a.deadline,) for a in meeting.actions], "topics": topics}[params["what"]]
    if family == "who":
        action = _action_for(meeting, params["task"])
        return [(action.owner,), (action.deadline,)]
    if family == "length_limit":
        return decisions
    if family == "part":
        topic = meeting.topics[params["topic_index"]]
        items = [(topic.decision,)]
        if topic.figure:
            items.append((str(topic.figure.value), topic.figure.unit))
        if topic.action:
            items.append((topic.action.owner, topic.action.task, topic.action.deadline))
        return items
    raise ValueError(f"unknown instruction family {family!r}")


def _action_for(meeting: Meeting, task: str):
    for action in meeting.actions:
        if action.task == task:
            return action
    raise ValueError(f"meeting {meeting.id} has no action item {task!r}")


def applicable(meeting: Meeting) -> list[Task]:
    """Every (family, params) choice that makes sense for this meeting (e.g. no figure list without figures)."""
    tasks = [Task("brief"), Task("bullets"), Task("json", {"keys": list(JSON_KEYS)}), Task("email")]
    for what in LIST_WHATS:
        if what != "figures" or meeting.figures:
            tasks.append(Task("list_every", {"what": what}))
    tasks += [Task("who", {"task": a.task}) for a in meeting.actions]
    reference_words = len(_decisions_line(meeting).split())
    tasks += [Task("length_limit", {"max_words": n}) for n in WORD_LIMITS if n >= reference_words]
    for index in range(len(meeting.topics)):
        tasks.append(Task("part", {"topic_index": index, "by": "name"}))
        if len(meeting.topics) > 1:
            tasks.append(Task("part", {"topic_index": index, "by": "position"}))
    return tasks


def sample_tasks(meeting: Meeting, rng: random.Random, count: int) -> list[Task]:
    """`count` tasks of distinct families (fewer if fewer apply): a family first, then its params."""
    by_family: dict[str, list[Task]] = {}
    for task in applicable(meeting):
        by_family.setdefault(task.family, []).append(task)
    families = rng.sample(sorted(by_family, key=FAMILIES.index), min(count, len(by_family)))
    return [rng.choice(by_family[family]) for family in families]


def instruction(meeting: Meeting, task: Task, style: str, rng: random.Random) -> str:
    """The instruction text of `task` in phrasing `style` ("train" | "shifted")."""
    options = PHRASINGS[task.family][style]
    params = task.params
    if task.family == "list_every":
        return options[0].format(what=LIST_LABELS[params["what"]])
    if task.family == "who":
        return options[0].format(task=params["task"])
    if task.family == "length_limit":
        return options[0].format(max_words=params["max_words"])
    if task.family == "part":
        topic = meeting.topics[params["topic_index"]]
        if params["by"] == "name":
            return options[0].format(topic=topic.name)
        last = params["topic_index"] == len(meeting.topics) - 1
        return options[1].format(ordinal="last" if last and params["topic_index"] > 1 else ORDINALS[params["topic_index"]])
    return rng.choice(options)


# ---------------------------------------------------------------------------------------------
# reference answers


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _action_sentences(meeting: Meeting) -> list[str]:
    return [f"{a.owner} will {a.task} by {a.deadline}." for a in meeting.actions]


def _decisions_line(meeting: Meeting) -> str:
    return "Decisions: " + "; ".join(t.decision for t in meeting.topics) + "."


def reference(meeting: Meeting, task: Task) -> str:
    """The answer a perfect summarizer gives: every fact of `facts`, the asked format, nothing invented."""
    family, params = task.family, task.params
    topic_names = [t.name for t in meeting.topics]
    decided = "The team decided to " + "; ".join(t.decision for t in meeting.topics) + "."
    if family == "brief":
        return " ".join([f"The meeting covered {_and(topic_names)}.", decided, *_action_sentences(meeting)])
    if family == "bullets":
        lines = []
        for topic in meeting.topics:
            lines.append(f"- {_sentence(topic.name)}: {topic.decision}.")
            if topic.figure:
                lines.append(f"- {_sentence(topic.figure.what)} is {topic.figure.text}.")
            if topic.action:
                lines.append(f"- {topic.action.owner} will {topic.action.task} by {topic.action.deadline}.")
        return "\n".join(lines)
    if family == "json":
        return json.dumps({"topics": topic_names, "decisions": [t.decision for t in meeting.topics],
                           "action_items": [{"owner": a.owner, "task": a.task, "deadline": a.deadline}
                                            for a in meeting.actions]})
    if family == "email":
        body = " ".join([f"Here is a summary of our meeting on {_and(topic_names)}.", decided,
                         *_action_sentences(meeting)])
        return f"Hi team,\n\n{body}\n\nBest regards,\n{meeting.participants[0]}"
    if family == "list_every":
        what = params["what"]
        if what == "participants":
            items = list(meeting.participants)
        elif what == "figures":
            items = [f"{_sentence(f.what)}: {f.text}" for f in meeting.figures]
        elif what == "deadlines":
            items = [f"{a.deadline} ({a.owner}, {a.task})" for a in meeting.actions]
        else:
            items = [_sentence(name) for name in topic_names]
        return "\n".join(f"- {item}" for item in items)
    if family == "who":
        action = _action_for(meeting, params["task"])
        return f"{action.owner} is responsible for it, due {action.deadline}."
    if family == "length_limit":
        return _decisions_line(meeting)
    if family == "part":
        topic = meeting.topics[params["topic_index"]]
        parts = [f"On {topic.name}, the team decided to {topic.decision}."]
        if topic.figure:
            parts.append(f"{_sentence(topic.figure.what)} is {topic.figure.text}.")
        if topic.action:
            parts.append(f"{topic.action.owner} will {topic.action.task} by {topic.action.deadline}.")
        return " ".join(parts)
    raise ValueError(f"unknown instruction family {family!r}")
