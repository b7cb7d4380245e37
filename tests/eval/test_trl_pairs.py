"""Preference rows in TRL's standard format with an explicit prompt: `prompt` is the instruction
(the audio in its own fields), `chosen` / `rejected` are the completions alone, and the fields the
project's DPO reads are unchanged. Checked with TRL's and datasets' own utilities where they are
installed."""
import json
import os

import pytest

from data.manifest import ManifestEntry, read_manifest
from eval.judge import Preference
from eval.preferences import Sample, pair_row

INSTRUCTION = "List the decisions as bullet points."
CHOSEN = Sample("- The remote costs 25 euros.", [17, 41, 9, 2], True)
REJECTED = Sample("- The remote costs 30 euros, due next", [17, 41, 8, 5], False)


@pytest.fixture
def rows(tmp_path):
    """Two pair rows as eval.preferences writes them, and the file they are in."""
    entry = ManifestEntry(id="m1", audio_filepath="audio/m1.wav", audio_path=tmp_path / "audio" / "m1.wav",
                          duration=12.5, offset=3.0, lang="en", transcript="A: 25 euros. B: Agreed.",
                          instruction=INSTRUCTION, extra={"summary": "reference", "meeting": "ES2004a"})
    other = ManifestEntry(id="m2", audio_filepath="audio/m2.wav", audio_path=tmp_path / "audio" / "m2.wav",
                          duration=4.0, instruction="Summarize in one sentence.")
    preference = Preference("a", "a", "a", ("A is complete.", "B is complete."))
    out_dir = tmp_path / "pairs"
    written = [pair_row(entry, CHOSEN, REJECTED, "a", preference, "judge", {"seed": 1}, out_dir),
               pair_row(other, REJECTED, CHOSEN, "b", preference, "judge", {"seed": 1}, out_dir)]
    out_dir.mkdir()
    path = out_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in written))
    return written, path


def test_prompt_is_the_instruction_and_the_dpo_fields_are_unchanged(rows):
    (first, second), _ = rows
    assert (first["prompt"], second["prompt"]) == (INSTRUCTION, "Summarize in one sentence.")
    assert (first["chosen"], first["rejected"]) == (CHOSEN.text, REJECTED.text)  # completions alone
    assert (first["chosen_token_ids"], first["rejected_token_ids"]) == ([17, 41, 9, 2], [17, 41, 8, 5])
    assert (first["chosen_finished"], first["rejected_finished"]) == (True, False)
    assert (second["chosen"], second["rejected"]) == (REJECTED.text, CHOSEN.text)
    assert (first["audio_filepath"], first["offset"], first["duration"]) == ("../audio/m1.wav", 3.0, 12.5)
    assert first["instruction"] == INSTRUCTION and first["meeting"] == "ES2004a" and "summary" not in first
    # without the prompt field, TRL would take the common prefix of the answers as the prompt:
    # here "- The remote costs ", which is not the prompt at all
    assert os.path.commonprefix([first["chosen"], first["rejected"]]) == "- The remote costs "
    assert not first["chosen"].startswith(first["prompt"])


def test_the_pairs_file_stays_a_manifest(rows):
    _, path = rows
    report = read_manifest(path, require=("instruction",))
    assert report.issues == [] and [e.extra["prompt"] for e in report.entries] == [
        INSTRUCTION, "Summarize in one sentence."]
    assert report.entries[0].audio_path == (path.parent / "../audio/m1.wav")


def test_datasets_loads_the_rows(rows):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed (optional)")
    _, path = rows
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")
    assert loaded.num_rows == 2 and {"prompt", "chosen", "rejected", "audio_filepath"} <= set(loaded.column_names)
    assert loaded[0]["prompt"] == INSTRUCTION and loaded[0]["chosen_token_ids"] == CHOSEN.token_ids


def test_trl_keeps_the_explicit_prompt(rows):
    data_utils = pytest.importorskip("trl.data_utils", reason="trl is not installed (optional)")
    written, _ = rows
    for row in written:
        assert not data_utils.is_conversational(row)  # the standard (plain text) format
        extracted = data_utils.maybe_extract_prompt(row)
        assert (extracted["prompt"], extracted["chosen"], extracted["rejected"]) == (
            row["prompt"], row["chosen"], row["rejected"])
    implicit = data_utils.maybe_extract_prompt({"chosen": CHOSEN.text, "rejected": REJECTED.text})
    assert implicit["prompt"] == "- The remote costs"  # what the rows would get without `prompt`

