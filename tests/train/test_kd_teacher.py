"""The KD teacher's tokenizer and chat template in the config (kd.teacher_tokenizer,
kd.teacher_template): validated when the config is read; `train.kd.make_teacher` builds the teacher's
prompts with them and, before the teacher model is loaded or any step is taken, refuses a teacher
whose vocabulary gives the student's token ids other text, naming kd.teacher_tokenizer."""
import json
import math
from pathlib import Path

import pytest

from model import load_pretrained
from model.tokenizer import load_tokenizer, train_sentencepiece
from rollout.teacher_format import EndOfTurnMapped
from rollout.teachers import LocalTeacher, teacher_prompt_ids
from tests.rollout.tiny_checkpoint import build_tiny_checkpoint, corpus, train_with_markers
from tests.train.toy_files import build_toy_files
from train import kd
from train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE_KD = ROOT / "configs" / "toy" / "smoke_kd.toml"
OTHER_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
               "quebec romeo sierra tango uniform victor whiskey").split()


def other_texts() -> list[str]:
    return [" ".join(OTHER_WORDS[(i * 7 + j) % len(OTHER_WORDS)] for j in range(9)).capitalize() + "."
            for i in range(300)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny teacher checkpoint; tokenizers: the harmony-marker one sharing its vocabulary, and one
    trained on other text (same special tokens, other ordinary pieces)."""
    root = tmp_path_factory.mktemp("kd_teacher")
    teacher = build_tiny_checkpoint(root / "teacher")
    harmony = train_with_markers(corpus(), root / "harmony" / "tokenizer.model")
    other = train_sentencepiece(other_texts(), root / "other" / "tokenizer", vocab_size=300).path
    return {"teacher": teacher, "harmony": harmony, "other": other}


# ---------------------------------------------------------------------------------------------
# config


def test_the_new_fields_default_to_todays_behaviour_and_take_overrides():
    config = load_config(SMOKE_KD)
    assert (config.kd.teacher_tokenizer, config.kd.teacher_template) == ("", "")
    config = load_config(SMOKE_KD, ["kd.teacher_tokenizer=teacher/tokenizer.json", "kd.teacher_template=harmony"])
    assert (config.kd.teacher_tokenizer, config.kd.teacher_template) == ("teacher/tokenizer.json", "harmony")


def test_a_template_string_in_a_file_is_read_with_its_escapes(tmp_path):
    path = tmp_path / "kd.toml"
    path.write_text('[kd]\nteacher = "openai:m"\nteacher_tokenizer = "t/tokenizer.json"\n'
                    'teacher_template = "<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n"\n')
    config = load_config(path)
    assert config.kd.teacher_template == "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


ALLOWED = ('allowed: "" or "phi" (the student\'s Phi-4 template), "chatml", "harmony" (gpt-oss), or a template '
           "string with {user} (or both {transcript} and {instruction}), no other placeholders, literal braces "
           "doubled, and the role markers as the teacher tokenizer's special-token text, e.g. "
           '"<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n"')


@pytest.mark.parametrize("value, shown", [("chatlm", '"chatlm"'), ('"<|a|>{transcript}"', '"<|a|>{transcript}"'),
                                          ('"{usr}<|e|>"', '"{usr}<|e|>"'), ('"a { b"', '"a { b"')])
def test_a_bad_template_is_refused_with_where_and_what_is_allowed(value, shown):
    override = f"kd.teacher_template={value}"
    with pytest.raises(ConfigError) as caught:
        load_config(SMOKE_KD, [override])
    assert str(caught.value) == f"override {override!r}: kd.teacher_template = {shown} is not allowed; {ALLOWED}"


def test_a_bad_template_in_a_file_names_the_line_and_wrong_types_are_refused(tmp_path):
    path = tmp_path / "kd.toml"
    path.write_text('[kd]\nteacher = "openai:m"\nteacher_template = "chatlm"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f'{path}, line 3: kd.teacher_template = "chatlm" is not allowed; allowed: ')
    for override in ("kd.teacher_tokenizer=3", "kd.teacher_template=[1]"):
        with pytest.raises(ConfigError) as caught:
            load_config(SMOKE_KD, [override])
        key, value = override.split("=")
        assert str(caught.value) == f"{SMOKE_KD} [kd].{key.split('.')[1]}: expected str, got {json.loads(value)!r}"


# ---------------------------------------------------------------------------------------------
# make_teacher


def teacher_config(files, tmp_path, *overrides):
    return load_config(SMOKE_KD, [f"kd.teacher=local:{files['teacher']}", f"run.out_dir={tmp_path}",
                                  f"data.train=[\"{tmp_path / 'none.jsonl'}\"]", *overrides])


def test_make_teacher_builds_prompts_in_the_teachers_template_and_tokenizer(files, tmp_path):
    student = load_pretrained(files["teacher"])
    tokenizer = load_tokenizer(files["teacher"])
    config = teacher_config(files, tmp_path, f"kd.teacher_tokenizer={files['harmony']}",
                            "kd.teacher_template=harmony")
    teacher = kd.make_teacher(config, student, tokenizer)
    harmony = load_tokenizer(files["harmony"], special_tokens={})
    # harmony ends a turn with <|return|>: the student's <|end|> (6), or its other stop id, is scored as that
    assert isinstance(teacher, EndOfTurnMapped) and isinstance(teacher.teacher, LocalTeacher)
    assert teacher.teacher.chat_template.name == "harmony"
    assert teacher.student_ends == (6, 2) and [teacher.teacher_end] == harmony.encode("<|return|>")
    prompt = teacher.prompt("Budget.", "Summarize.")
    assert prompt == teacher_prompt_ids(harmony, "Budget.", "Summarize.", chat_template="harmony")
    assert prompt[:1] == [4] and prompt[-1] == 6 and prompt.count(4) == 3  # <|start|> x 3, ends <|message|>
    # the default: the checkpoint's own tokenizer, the Phi template, exactly today's prompt
    default = kd.make_teacher(teacher_config(files, tmp_path), student, tokenizer)
    assert isinstance(default, LocalTeacher)  # the student's own format: nothing to map
    assert default.prompt("Budget.", "Summarize.") == teacher_prompt_ids(tokenizer, "Budget.", "Summarize.")


def test_a_mismatched_teacher_vocabulary_is_refused_before_the_teacher_loads(files, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(files["teacher"])

    def never(*args, **kwargs):
        raise AssertionError("the teacher model was loaded before the vocabulary check")
    monkeypatch.setattr(LocalTeacher, "from_pretrained", never)
    config = teacher_config(files, tmp_path, f"kd.teacher_tokenizer={files['other']}")
    with pytest.raises(ConfigError) as caught:
        kd.make_teacher(config, None, tokenizer)
    message = str(caught.value)
    assert message.startswith(f"kd.teacher_tokenizer: the teacher's tokenizer (kd.teacher_tokenizer = "
                              f"'{files['other']}') does not share the student's vocabulary "
                              f"(runs/smoke/sft/merged) for ordinary text: on ")
    assert "the student's token" in message and "but the teacher's token" in message
    assert message.endswith("Set kd.teacher_tokenizer to the teacher's own tokenizer if this is not it, or distil "
                            "from a teacher of the student's vocabulary (Phi-4-mini's is o200k: e.g. gpt-oss with "
                            "kd.teacher_template = \"harmony\"; Llama and Qwen are not). Cross-tokenizer "
                            "distillation is not supported.")
    # the same for a remote teacher given the tokenizer
    remote = load_config(SMOKE_KD, ["kd.teacher=openai:m", "kd.base_url=http://127.0.0.1:9/v1", "kd.api_key_env=",
                                    f"kd.teacher_tokenizer={files['other']}", f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^kd.teacher_tokenizer: the teacher's tokenizer \(kd.teacher_tokenizer"):
        kd.make_teacher(remote, None, tokenizer)


def test_a_remote_teacher_template_needs_the_teachers_tokenizer(files, tmp_path):
    tokenizer = load_tokenizer(files["teacher"])
    base = ["kd.teacher=openai:m", "kd.base_url=http://127.0.0.1:9/v1", "kd.api_key_env=", f"run.out_dir={tmp_path}"]
    with pytest.raises(ConfigError) as caught:
        kd.make_teacher(load_config(SMOKE_KD, [*base, "kd.teacher_template=chatml"]), None, tokenizer)
    assert str(caught.value).startswith(
        "kd.teacher_template = 'chatml' with the teacher's tokenizer (the student's, as kd.teacher_tokenizer is "
        "empty): the marker '<|im_start|>' of kd.teacher_template is not one token of the teacher's tokenizer")
    teacher = kd.make_teacher(load_config(SMOKE_KD, [*base, f"kd.teacher_tokenizer={files['harmony']}",
                                                     "kd.teacher_template=harmony"]), None, tokenizer)
    harmony = load_tokenizer(files["harmony"], special_tokens={})
    assert teacher.prompt("Budget.", "Summarize.") == teacher_prompt_ids(harmony, "Budget.", "Summarize.",
                                                                         chat_template="harmony")
    with pytest.raises(ConfigError, match=r"^kd.teacher_tokenizer = '.*nowhere': no tokenizer at .*nowhere"):
        kd.make_teacher(load_config(SMOKE_KD, [*base, f"kd.teacher_tokenizer={tmp_path / 'nowhere'}"]), None,
                        tokenizer)


def test_manifest_texts_reads_the_first_records(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"instruction": "Summarize.", "transcript": "x" * 3000, "summary": "A summary."}, "not an object",
            {"context": "List it.", "answer": "- it", "duration": 1.0}, {"instruction": "Third."}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    assert kd.manifest_texts([tmp_path / "missing.jsonl", path], records=2) == [
        "Summarize.", "A summary.", "x" * 2000, "List it.", "- it"]


# ---------------------------------------------------------------------------------------------
# the recipe


def run_kd(root: Path, monkeypatch, capsys, *overrides) -> tuple[int, str]:
    monkeypatch.chdir(root)
    code = kd.main(["--config", str(SMOKE_KD), "model.checkpoint=toy/checkpoints/student", "run.merge_at_end=false",
                    "optim.max_steps=1", *overrides])
    return code, capsys.readouterr().err


def test_the_recipe_refuses_a_mismatched_teacher_before_any_step_and_runs_a_matching_one(files, tmp_path,
                                                                                        monkeypatch, capsys):
    root = build_toy_files(tmp_path)
    code, err = run_kd(root, monkeypatch, capsys, f"kd.teacher_tokenizer={files['other']}", "run.out_dir=runs/bad")
    assert code == 2 and "Traceback" not in err
    assert f"train.kd: kd.teacher_tokenizer: the teacher's tokenizer (kd.teacher_tokenizer = '{files['other']}') " \
           "does not share the student's vocabulary (toy/checkpoints/student) for ordinary text: on " in err
    assert sorted(p.name for p in (root / "runs" / "bad").iterdir()) == []  # no step, no metrics, no checkpoint
    code, err = run_kd(root, monkeypatch, capsys, f"kd.teacher_tokenizer={files['harmony']}",
                       "kd.teacher_template=harmony", "run.out_dir=runs/good")
    assert code == 0, err
    records = [json.loads(line) for line in (root / "runs" / "good" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "divergence" in r]
    assert [r["step"] for r in steps] == [1] and math.isfinite(steps[0]["divergence"]) and steps[0]["divergence"] > 0
