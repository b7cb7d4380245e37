"""A meeting record -> dialogue turns (who says what), in one of two phrasing styles.

The order of a meeting: everyone introduces themselves, the chair (participants[0]) opens and
names the agenda, one line of small talk and a short reply, then per topic: the chair
introduces it, someone states its figure, someone proposes the decision and another agrees,
the chair assigns the action item by name with its deadline and the owner confirms; the chair
closes. Every fact of the record is spoken, and nothing else that the oracle counts as an entity
(no digits outside figures and dates), so the transcript and the record agree.

Styles: "train" phrasings are used by every split but the shifted test, which uses the disjoint
"shifted" phrasings (the paper's out-of-domain benchmarks differ in speakers and in wording).
Phrasings are picked per turn from the meeting's own random stream, so rendering is
deterministic for a (record, style, seed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .world import Meeting

STYLES = ("train", "shifted")

PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "intro": {
        "train": ("Hi, {name} here.", "Hello, this is {name}.", "{name} here, hello everyone."),
        "shifted": ("Morning all, {name} speaking.", "Hey folks, it is {name}.", "{name} on the line."),
    },
    "open": {
        "train": ("Let us get started. Today we cover {agenda}.", "Thanks for joining. On the agenda today: {agenda}."),
        "shifted": ("Right, shall we begin? We need to go through {agenda}.", "Okay, today's items are {agenda}."),
    },
    "reply": {
        "train": ("Oh, that sounds rough.", "Ha, I know the feeling."),
        "shifted": ("Oh dear, sorry to hear it.", "Well, that happens."),
    },
    "topic": {
        "train": ("Next up, {topic}.", "Let us talk about {topic}.", "Moving on to {topic}."),
        "shifted": ("Now, regarding {topic}.", "What about {topic}?", "Turning to {topic}."),
    },
    "figure": {
        "train": ("For context, {what} is {value}.", "Right now {what} is {value}."),
        "shifted": ("The numbers say {what} is at {value}.", "I checked, {what} stands at {value}."),
    },
    "propose": {
        "train": ("I suggest we {decision}.", "I think we should {decision}."),
        "shifted": ("My proposal is to {decision}.", "How about we {decision}?"),
    },
    "agree": {
        "train": ("Agreed, let us {decision}.", "Yes, we will {decision}."),
        "shifted": ("Fine by me, we {decision} then.", "Sounds good, so we {decision}."),
    },
    "assign": {
        "train": ("{owner}, can you {task} by {deadline}?", "{owner}, please {task} by {deadline}."),
        "shifted": ("{owner}, would you {task} before {deadline}?", "Could {owner} {task} no later than {deadline}?"),
    },
    "confirm": {
        "train": ("Sure, I will {task} by {deadline}.", "Okay, I will do it by {deadline}."),
        "shifted": ("No problem, {deadline} works for me.", "Consider it done by {deadline}."),
    },
    "close": {
        "train": ("Thanks everyone, see you next time.", "Great, that is all for today."),
        "shifted": ("Cheers all, talk soon.", "Lovely, we are done here."),
    },
}


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def render_dialogue(meeting: Meeting, style: str, rng: random.Random) -> list[Turn]:
    """The turns of `meeting` in phrasing `style` ("train" | "shifted")."""
    if style not in STYLES:
        raise ValueError(f"unknown dialogue style {style!r}; expected one of {STYLES}")

    def say(slot: str, **slots) -> str:
        text = rng.choice(PHRASES[slot][style]).format(**slots)
        return text[0].upper() + text[1:]

    chair, people = meeting.participants[0], meeting.participants
    turns = [Turn(name, say("intro", name=name)) for name in people]
    turns.append(Turn(chair, say("open", agenda=_join([t.name for t in meeting.topics]))))
    turns.append(Turn(meeting.small_talk_by, meeting.small_talk[0].upper() + meeting.small_talk[1:] + "."))
    turns.append(Turn(rng.choice([p for p in people if p != meeting.small_talk_by]), say("reply")))
    for topic in meeting.topics:
        turns.append(Turn(chair, say("topic", topic=topic.name)))
        if topic.figure:
            turns.append(Turn(rng.choice(people), say("figure", what=topic.figure.what, value=topic.figure.text)))
        proposer = rng.choice(people)
        turns.append(Turn(proposer, say("propose", decision=topic.decision)))
        turns.append(Turn(rng.choice([p for p in people if p != proposer]), say("agree", decision=topic.decision)))
        if topic.action:
            action = topic.action
            assigner = chair if action.owner != chair else people[1]
            turns.append(Turn(assigner, say("assign", owner=action.owner, task=action.task, deadline=action.deadline)))
            turns.append(Turn(action.owner, say("confirm", task=action.task, deadline=action.deadline)))
    turns.append(Turn(chair, say("close")))
    return turns


def transcript(turns: list[Turn]) -> str:
    """The words spoken, turn after turn, without speaker labels (what the audio contains)."""
    return " ".join(turn.text for turn in turns)
