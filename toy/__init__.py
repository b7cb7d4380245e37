"""The toy world: synthetic spoken meetings whose truth is known, for `make demo`.

    python -m toy.corpus --preset demo      # or quick; prints the corpus folder (cached)

The paper's data (anonymised recordings, GPT-4.1 queries and references, a GPT-4.1 judge) is not
available on a fresh machine; this package builds a world where every claim can be checked in
minutes on a CPU. Modules, one job each:

  world.py     meeting records (participants, topics, decisions, figures, action items with
               owner and deadline, small talk) drawn from closed pools: the ground truth
  dialogue.py  record -> dialogue turns by 2-4 speakers, "train" or "shifted" phrasings
  speech.py    turns -> 16 kHz audio with espeak-ng (a voice per speaker, speed and pitch
               jitter, optional noise); 333 training voices, a disjoint set of unseen ones
  tasks.py     instruction families (brief, bullets, JSON, e-mail, list every X, who is
               responsible for Y, length limits, part-of-the-meeting questions), the facts each
               asks for, and reference answers rendered from the record (the stand-in for
               GPT-4.1's references, section 2.1)
  corpus.py    splits (pretrain ASR, teacher text, SFT, KD pool, DPO pool, validation with
               training and with unseen voices, tests: in-domain, unseen voices, unseen voices
               and phrasings), manifests with `judge_source`, the seeded, crash-safe cache
               (docs/toy-world.md)
  encoder_ctc.py  the speech encoder alone, trained as a CTC recognizer (its first
               pre-training step)
  pretrain.py  the tokenizer, the text teacher, the encoder, then the student at its
               pre-training stage (`make pretrain-toy`; the project ships the result in
               toy/checkpoints/); loop_state.py: the schedule and resumable state its loops share
  oracle.py    the judge that scores against the records (the stand-in for the GPT-4.1
               judge, section 3.4, and for the DPO preference judge, section 2.3)
  demo.py      `make demo`: SFT -> on-policy KD -> DPO through the user's entry points
               (train.sft / train.kd / train.dpo / eval.preferences / rollout.server / eval.run)
               with configs/toy/demo_*.toml, ablations included (docs/demo.md)
  demo_schedule.py  the demo's stage scheduler: stages side by side, stages reused on a rerun
  report.py    results/toy/REPORT.md, results.json, results.png, every claim of the paper
               checked against the measured numbers; the tables are report_tables.py, the
               claims' verdicts report_verdicts.py

Departures from the paper's setting, all forced by a CPU budget and all written where they act:
the models are tiny (the student: hidden 128, 4 layers, encoder hidden 96, 2 blocks; the
teacher: hidden 256, 4 layers, text only), the pre-training stage is an hour of CTC and decoder ASR
plus text instruction tuning instead of Phi-4MM's, the student standardises its projected audio per clip
(model/projector.py, not in Phi-4MM), and the ablations of Table 3 start from the SFT
checkpoint, not from the base model.
"""
