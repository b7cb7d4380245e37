"""A hand-made meeting record whose oracle scores the tests derive by hand."""
from __future__ import annotations

import json

from toy.tasks import Task
from toy.world import Action, Figure, Meeting, Topic

MEETING = Meeting(
    id="hand-00000",
    participants=("Alice", "Bruno"),
    topics=(
        Topic("the budget", "cut the travel costs", Figure("the remaining budget", 4500, "euros"),
              Action("Bruno", "send the draft", "Friday")),
        Topic("the website", "add a search bar", None, None),
    ),
    small_talk="my train from Oslo was late again this morning",
    small_talk_by="Alice",
    city="Oslo",
)


def source(task: Task, meeting: Meeting = MEETING) -> str:
    """The judge_source of (meeting, task), as toy.corpus writes it."""
    return json.dumps({"meeting": meeting.to_dict(), "task": task.to_dict()}, sort_keys=True)
