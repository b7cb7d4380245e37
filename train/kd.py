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
"""
import sys

from rollout.api_client import RetryPolicy
from rollout.remote_teacher import OpenAICompatibleTeacher
from rollout.teachers import LocalTeacher

from .config import ConfigError
from .stages import KDStage
from .recipe import run_recipe


def make_teacher(config, model, tokenizer):
    kind, _, target = config.kd.teacher.partition(":")
    if kind == "local" and target:
        device = model.decoder.embed_tokens.weight.device
        return LocalTeacher.from_pretrained(target, device=device)
    if kind == "openai" and target:
        if not config.kd.base_url:
            raise ConfigError("[kd] base_url: needed for an openai: teacher (e.g. http://127.0.0.1:8000/v1)")
        try:
            return OpenAICompatibleTeacher(config.kd.base_url, target, config.kd.top_k, tokenizer=tokenizer,
                                           api_key_env=config.kd.api_key_env or None, timeout_s=config.kd.timeout_s,
                                           retry=RetryPolicy(max_attempts=config.kd.max_attempts),
                                           max_concurrency=config.kd.max_concurrency,
                                           cache_dir=f"{config.run.out_dir}/teacher_cache" if config.kd.response_cache
                                           else None)
        except ValueError as error:  # the key's variable unset, a bad URL: say it as a config problem
            raise ConfigError(f"[kd] teacher {config.kd.teacher!r} at {config.kd.base_url}: {error} (in the config: "
                              f"kd.api_key_env names the variable; kd.api_key_env=\"\" for a server without "
                              f"authentication)") from None
    raise ConfigError(f"[kd] teacher: expected 'local:DIR' or 'openai:MODEL', got {config.kd.teacher!r}")


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
