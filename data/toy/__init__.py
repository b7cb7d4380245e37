"""The toy world: synthetic spoken meetings whose truth is known, for `make demo` (issue 10).

    python -m data.toy.corpus --preset demo      # or quick; prints the corpus folder (cached)

The paper's data (anonymised recordings, GPT-4.1 queries and references, a GPT-4.1 judge) is not
available on a fresh machine; this package builds a world where every claim can be checked in
minutes on a CPU. Modules, one job each:

  world.py     meeting records (participants, topics, decisions, figures, action items with
               owner and deadline, small talk) drawn from closed pools: the ground truth
  dialogue.py  record -> dialogue turns by 2-4 speakers, "train" or "shifted" phrasings
  speech.py    turns -> 16 kHz audio with espeak-ng (a voice per speaker, speed and pitch
               jitter, optional noise); "train" or unseen "shifted" voices
  tasks.py     instruction families (brief, bullets, JSON, e-mail, list every X, who is
               responsible for Y, length limits, part-of-the-meeting questions), the facts each
               asks for, and reference answers rendered from the record (the stand-in for
               GPT-4.1's references, section 2.1)
  corpus.py    splits (pretrain ASR, teacher text, SFT, KD pool, DPO pool, in-domain and shifted
               tests), manifests with `judge_source`, the seeded, crash-safe cache
  pretrain.py  the tokenizer, the student at its pre-training stage and the text teacher

The oracle judge that scores against the records is eval/oracle.py (the stand-in for the
GPT-4.1 judge, section 3.4, and for the DPO preference judge, section 2.3).

Plan of the demo pipeline (`make demo`, to land as data/toy/demo.py; not written yet)
-------------------------------------------------------------------------------------
One script, `python -m data.toy.demo [--quick] [--out results/toy]`, that runs the user's entry
points (train.sft / train.kd / train.dpo / data.preferences / eval.run / rollout.server) as
subprocesses with configs/toy/demo_*.toml (the A100 recipes' configs differ only in sizes), and
skips a stage whose output folder has a `DONE` stamp (a rerun reuses finished stages). Progress
is one line per stage plus the recipes' own logs.

  1. corpus      data.toy.corpus.build_corpus(seed, PRESETS["demo" | "quick"]) (done, cached).
  2. tokenizer   in data/toy/pretrain.py: train_sentencepiece(training_texts(corpus), vocab 512), the
                 training splits' text only, so the shifted test's phrasings stay unseen.
  3. pretrain    data/toy/pretrain.py (written; `make pretrain-toy`, shipped as small checkpoints
                 so the demo need not run it): the student in two steps, (a) its decoder
                 instruction-tuned on text (the toy "Phi-4-mini"; in text mode it is also the
                 weak teacher of the ablation), (b) ASR on pretrain.jsonl with encoder +
                 projector trained and the decoder frozen, as Phi-4MM aligns its encoder.
                 Plain loops, not train/: the toy's substitute for a downloaded model.
  4. teacher     the same script: a wider, deeper decoder trained on teacher.jsonl + sft.jsonl as
                 text, transcript + instruction -> reference (the GPT-4o-text stand-in; it never
                 hears audio).
  5. SFT         train.sft on sft.jsonl from the pretrain checkpoint (LoRA r16 a32 + projector).
  6. KD          train.kd on kd.jsonl, kd.teacher = local:teacher (full vocabulary).
                 Ablations: (i) top-20 API: rollout.server over the teacher on 127.0.0.1 and
                 kd.teacher = openai:toy-teacher, kd.base_url, kd.top_k = 20; (ii) weak teacher:
                 the student's own SFT checkpoint in text mode (Table 3's "Phi-4MM text").
  7. DPO         data.preferences on dpo.jsonl from the KD checkpoint (2 samples, the oracle
                 judge reading `judge_source`, ties dropped) -> pairs.jsonl; train.dpo with the
                 KD checkpoint as reference. Ablation: DPO from SFT without KD.
  8. evaluation  eval.run --judge oracle on test_in.jsonl and test_shifted.jsonl for every stage
                 and ablation; the teacher on transcripts is the ceiling (needs a text-mode
                 evaluation of a checkpoint: transcript in the prompt, no audio).
  9. report      results/toy/REPORT.md (Table-1-style: teacher-text ceiling, pretrain, SFT,
                 SFT+KD, SFT+KD+DPO per split; repetition and hallucination rates per stage from
                 eval.oracle.OracleScore; Table-3-style ablations: DPO without KD, KD with the
                 weak teacher, full vocabulary vs top-20), results.json (stage -> split -> mean),
                 a PNG, and each claim of PAPER.md checked with its numbers, said plainly when it
                 does not reproduce. The judge and the test sets are fixed before any training.
Budget: 20 minutes on 2 CPU cores for the demo preset, 5 for --quick (measured when it lands;
the corpus takes 98 s for "demo" with 2 workers and 17 s for "quick" with 1).

Measured so far (1 CPU thread, demo corpus; probes, not shipped results): the text teacher
(hidden 256, 6 layers) takes about 2.7 s per batch of 16 (prompts of 200-380 tokens); 500 steps
on the 720 manifest rows memorise them (loss 0.06) and score 2.34 on test_in in text mode; 250
steps with 4000 extra text meetings (half an epoch, loss 0.46) score 1.66 (in) and 1.02
(shifted): the teacher needs thousands of steps. ASR alignment with the decoder frozen (1500
steps of 16 turns, loss 5.0 -> 2.6) does not yet transcribe. The whole chain corpus ->
pretrain -> train.sft -> train.kd (local teacher, and top-20 through rollout.server) ->
eval.run --judge oracle runs end to end on the quick preset.
"""
