"""Stage 2, on-policy KD (paper section 2.2): `python -m train.kd --config FILE [section.key=value ...]`.

Data: manifests with `instruction` and `transcript` (no reference summaries needed). The teacher
reads the transcript (`kd.teacher`):
  local:DIR      a checkpoint of this project in text mode, full vocabulary, on this process's device;
  openai:MODEL   an OpenAI-compatible /v1/completions endpoint at kd.base_url that scores supplied
                 token ids (vLLM's prompt_logprobs, or echo + logprobs), top kd.top_k; the API key is
                 read from the environment variable named by kd.api_key_env ("" for a server without
                 authentication, e.g. a local vLLM or python -m rollout.server); each request
                 waits at most kd.timeout_s and is tried kd.max_attempts times (timeouts, 429s and
                 5xx are retried with exponential backoff), so a hung teacher fails the run after
                 about max_attempts x (timeout_s + backoff), with the time it took said; at most
                 kd.max_concurrency requests are in flight. kd.response_cache (off) keeps every
                 answer under run.out_dir/teacher_cache: on-policy rollouts are new at every
                 step, so it only pays when a run is repeated on the same samples.

The teacher's prompt is built in the teacher's chat format (kd.teacher_template: "" / "phi" the
student's, "chatml", "harmony", or a template string) with the teacher's tokenizer
(kd.teacher_tokenizer; "" = local:DIR's own, or the student's for openai:); the student's
response ids follow it unchanged. Before any step, `make_teacher` refuses a teacher whose
tokenizer lacks the template's markers, or whose vocabulary gives the student's ids other text
on ordinary text (rollout.teachers.vocabulary_mismatch on fixed sample sentences and the first
records of data.train), or (local:) whose output layer is not the student's size.
"""
import json
import sys
from pathlib import Path

from api.retry import RetryPolicy
from rollout.remote_teacher import OpenAICompatibleTeacher
from rollout.teacher_format import EndOfTurnMapped, TeacherChatTemplate, load_teacher_tokenizer, vocabulary_mismatch
from rollout.teachers import LocalTeacher

from .config import ConfigError
from .stages import KDStage
from .recipe import run_recipe

# Manifest fields whose text the vocabulary check reads (NeMo's names too), and how much of each.
SAMPLE_FIELDS = ("instruction", "context", "summary", "answer", "transcript", "text")
SAMPLE_RECORDS, SAMPLE_CHARS = 4, 2000


def make_teacher(config, model, tokenizer):
    """The teacher kd.teacher names, its prompts in kd.teacher_template with the tokenizer of
    kd.teacher_tokenizer, checked against the student's vocabulary before any step (ConfigError)."""
    kd = config.kd
    kind, _, target = kd.teacher.partition(":")
    if kind not in ("local", "openai") or not target:
        raise ConfigError(f"[kd] teacher: expected 'local:DIR' or 'openai:MODEL', got {kd.teacher!r}")
    if kind == "openai" and not kd.base_url:
        raise ConfigError("[kd] base_url: needed for an openai: teacher (e.g. http://127.0.0.1:8000/v1)")
    try:
        chat_template = TeacherChatTemplate.parse(kd.teacher_template)
    except ValueError as error:  # load_config has checked it; a config built in code may not have been
        raise ConfigError(f"kd.teacher_template: {error}") from None
    teacher_tokenizer = _teacher_tokenizer(config, chat_template, target if kind == "local" else "", tokenizer)
    # None: an openai: teacher built without a tokenizer (it can score, and says so when asked for a prompt)
    problem = teacher_tokenizer is not None and chat_template.tokenizer_problem(teacher_tokenizer)
    if problem:
        raise ConfigError(f"kd.teacher_template = {kd.teacher_template or 'phi'!r} with the teacher's tokenizer "
                          f"({_teacher_tokenizer_source(config, kind, target)}): {problem}")
    if tokenizer is not None and teacher_tokenizer is not tokenizer:
        check_teacher_vocabulary(config, tokenizer, teacher_tokenizer, kind, target)
    if kind == "local":
        device = model.decoder.embed_tokens.weight.device
        teacher = LocalTeacher.from_pretrained(target, device=device, tokenizer=teacher_tokenizer,
                                               chat_template=chat_template)
        teacher_rows, student_rows = teacher.model.decoder.config.vocab_size, model.decoder.config.vocab_size
        if teacher_rows != student_rows:
            raise ConfigError(f"kd.teacher = {kd.teacher!r}: the teacher's output layer has {teacher_rows} tokens and "
                              f"the student's {student_rows}; a local teacher gives its whole distribution, which "
                              "the KD loss compares with the student's token by token, so the sizes must be equal "
                              "(use a teacher of the student's vocabulary, or serve it and use kd.teacher = "
                              "\"openai:MODEL\" with top-k)")
        return end_of_turn_mapped(teacher, chat_template, teacher_tokenizer, tokenizer, model)
    try:
        teacher = OpenAICompatibleTeacher(kd.base_url, target, kd.top_k, tokenizer=teacher_tokenizer,
                                       chat_template=chat_template,
                                       api_key_env=kd.api_key_env or None, timeout_s=kd.timeout_s,
                                       retry=RetryPolicy(max_attempts=kd.max_attempts),
                                       max_concurrency=kd.max_concurrency,
                                       cache_dir=f"{config.run.out_dir}/teacher_cache" if kd.response_cache else None)
    except ValueError as error:  # the key's variable unset, a bad URL: say it as a config problem
        raise ConfigError(f"[kd] teacher {kd.teacher!r} at {kd.base_url}: {error} (in the config: "
                          f"kd.api_key_env names the variable; kd.api_key_env=\"\" for a server without "
                          f"authentication)") from None
    return end_of_turn_mapped(teacher, chat_template, teacher_tokenizer, tokenizer, model)


def end_of_turn_mapped(teacher, chat_template: TeacherChatTemplate, teacher_tokenizer, tokenizer, model):
    """`teacher` behind rollout.teacher_format.EndOfTurnMapped when its template ends a turn with a
    special token of its own (a template other than "phi"): the student's end-of-turn id (its
    template's `<|end|>`, then the model's other stop ids) is scored as the teacher's."""
    marker = chat_template.end_marker
    if marker is None or teacher_tokenizer is None:
        return teacher
    ids = teacher_tokenizer.encode(marker)
    if len(ids) != 1:
        raise ConfigError(f"kd.teacher_template = {chat_template.spec!r} ends a turn with {marker!r}, which the "
                          f"teacher's tokenizer encodes as {len(ids)} ids {ids[:8]}: set kd.teacher_tokenizer to the "
                          "teacher's own tokenizer, which has it as one special token")
    primary = getattr(tokenizer, "special_ids", {}).get("end") if tokenizer is not None else None
    stops = model.config.decoder.eos_token_ids if model is not None else getattr(tokenizer, "eos_token_ids", ())
    student_ends = tuple(dict.fromkeys([*([primary] if primary is not None else []), *stops]))
    return EndOfTurnMapped(teacher, student_ends, ids[0])


def _teacher_tokenizer_source(config, kind: str, target: str) -> str:
    if config.kd.teacher_tokenizer:
        return f"kd.teacher_tokenizer = {config.kd.teacher_tokenizer!r}"
    if kind == "local":
        return f"the one in {target}, as kd.teacher_tokenizer is empty"
    return "the student's, as kd.teacher_tokenizer is empty"


def _teacher_tokenizer(config, chat_template: TeacherChatTemplate, local_dir: str, student_tokenizer):
    """kd.teacher_tokenizer; if empty, the local teacher's checkpoint's, else the student's (that object)."""
    path = config.kd.teacher_tokenizer or local_dir
    if not path:
        return student_tokenizer
    try:
        return load_teacher_tokenizer(path, chat_template)
    except (FileNotFoundError, ValueError, ImportError) as error:
        if config.kd.teacher_tokenizer:
            raise ConfigError(f"kd.teacher_tokenizer = {path!r}: {error}; point it at the teacher's tokenizer "
                              "(a tokenizer.json, a SentencePiece .model, or a directory holding one)") from None
        raise ConfigError(f"kd.teacher = {config.kd.teacher!r}: reading the teacher's tokenizer from its checkpoint "
                          f"failed ({error}); set kd.teacher_tokenizer to the teacher's tokenizer") from None


def check_teacher_vocabulary(config, student_tokenizer, teacher_tokenizer, kind: str, target: str) -> None:
    """ConfigError unless the teacher's tokenizer gives the student's token ids the student's text on
    ordinary text: fixed sample sentences and the first records of data.train (see the module docstring)."""
    mismatch = vocabulary_mismatch(student_tokenizer, teacher_tokenizer, manifest_texts(config.data.train))
    if mismatch is None:
        return
    student = config.model.tokenizer or config.model.checkpoint
    raise ConfigError(
        f"kd.teacher_tokenizer: the teacher's tokenizer ({_teacher_tokenizer_source(config, kind, target)}) does not "
        f"share the student's vocabulary ({student}) for ordinary text: {mismatch}. The teacher (kd.teacher = "
        f"{config.kd.teacher!r}) scores the student's token ids as they are, so every id must be the same text to "
        "both; only special tokens may differ. Set kd.teacher_tokenizer to the teacher's own tokenizer if this is "
        "not it, or distil from a teacher of the student's vocabulary (Phi-4-mini's is o200k: e.g. gpt-oss with "
        "kd.teacher_template = \"harmony\"; Llama and Qwen are not). Cross-tokenizer distillation is not supported.")


def manifest_texts(paths, records: int = SAMPLE_RECORDS, chars: int = SAMPLE_CHARS) -> list[str]:
    """The text fields of the first `records` records of the first manifest(s) in `paths`, each cut to
    `chars` characters: ordinary text of the run's own kind for the vocabulary check. Lines that do not
    read as JSON objects are passed over (the dataset reports them)."""
    texts: list[str] = []
    for path in paths:
        try:
            with Path(path).open(encoding="utf-8") as handle:
                for line in handle:
                    if records <= 0:
                        return texts
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict):
                        records -= 1
                        texts += [row[f][:chars] for f in SAMPLE_FIELDS if isinstance(row.get(f), str)]
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def make_stage(config, model, tokenizer) -> KDStage:
    kd = config.kd
    return KDStage(make_teacher(config, model, tokenizer), pad_token_id=model.config.decoder.pad_token_id,
                   eos_token_ids=model.config.decoder.eos_token_ids, max_new_tokens=kd.max_new_tokens,
                   temperature=kd.temperature, on_policy_fraction=kd.on_policy_fraction,
                   divergence=kd.divergence, beta=kd.beta if kd.divergence == "jsd" else None,
                   ce_weight=kd.ce_weight, decode=tokenizer.decode)


def main(argv=None) -> int:
    """lambda = 1 (the paper) needs prompts only; lambda < 1 also distils on reference summaries."""
    config_task = lambda config: "prompt" if config.kd.on_policy_fraction >= 1 else "sft"  # noqa: E731
    return run_recipe("kd", make_stage, task=config_task, argv=argv,
                      reserve_tokens=lambda config: config.kd.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
