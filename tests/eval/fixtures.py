"""Generated benchmark fixtures: an AMI corpus excerpt in the real NXT layout, FLORAS exports,
a jsonl benchmark, and a tiny audio checkpoint to decode with."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile
import torch

from model import SpeechLM, save_pretrained, toy
from model.config import EncoderConfig
from model.tokenizer import config_token_ids, train_sentencepiece
from tests.rollout.tiny_checkpoint import corpus

NITE = "http://nite.sourceforge.net/"


def tone(seconds: float, freq: float, rate: int = 16000, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, seconds: float, freq: float, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), tone(seconds, freq, rate), rate)
    return path


def _words_xml(meeting: str, speaker: str, elements: list[str]) -> str:
    body = "\n".join(f"   {e.format(id=f'{meeting}.{speaker}.words{i}')}" for i, e in enumerate(elements))
    return (f'<?xml version="1.0" encoding="ISO-8859-1" standalone="yes"?>\n'
            f'<nite:root nite:id="{meeting}.{speaker}.words" xmlns:nite="{NITE}">\n{body}\n</nite:root>\n')


def w(start: float, end: float, text: str, **attrs: str) -> str:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f'<w nite:id="{{id}}" starttime="{start}" endtime="{end}"{extra}>{text}</w>'


# ES2004a: A opens; B and D interject while A is speaking; C laughs, then answers.
ES2004A_WORDS = {
    "A": [w(0.50, 0.80, "Okay"), w(0.80, 0.80, ",", punc="true"), w(0.90, 1.20, "let's"), w(1.20, 1.50, "start"),
          w(1.50, 1.50, ".", punc="true"),
          '<vocalsound nite:id="{id}" starttime="1.6" endtime="1.9" type="cough"/>',
          w(3.00, 3.30, "The"), w(3.30, 3.60, "remote"), w(3.60, 4.00, "costs"), w(4.00, 4.40, "twenty-five"),
          w(4.40, 4.80, "euros"), w(4.80, 4.80, ".", punc="true")],
    "B": ['<disfmarker nite:id="{id}" starttime="3.1" endtime="3.1"/>',
          w(3.80, 3.95, "Wow"), w(5.00, 5.20, "Too"), w(5.20, 5.50, "expensive"), w(5.50, 5.50, "?", punc="true"),
          # a word without timings (the corpus has a few): it takes the previous element's start time
          '<w nite:id="{id}">Really</w>'],
    "C": ['<vocalsound nite:id="{id}" starttime="5.0" endtime="5.4" type="laugh"/>',
          w(6.50, 6.80, "We"), w(6.80, 7.10, "agreed"), w(7.10, 7.10, ".", punc="true")],
    "D": [w(4.20, 4.35, "Mm-hmm"),
          '<w nite:id="ES2004a.D.wordsx1" starttime="6.3" endtime="6.5">duplicate</w>'],
}
ES2004A_TRANSCRIPT = (
    "A: Okay, let's start. The remote costs\n"
    "B: Wow\n"
    "A: twenty-five\n"
    "D: Mm-hmm\n"
    "A: euros.\n"
    "B: Too expensive? Really\n"
    "C: We agreed."
)
# TS3003c: two speakers talking at the same instant (ties broken by speaker letter).
TS3003C_WORDS = {
    "A": [w(1.0, 1.3, "Hello"), w(1.3, 1.6, "everyone")],
    "B": [w(1.0, 1.2, "Hi"), w(2.0, 2.3, "there")],
}
TS3003C_TRANSCRIPT = "A: Hello\nB: Hi\nA: everyone\nB: there"

ES2004A_ABSTRACT = f"""<?xml version="1.0" encoding="ISO-8859-1" standalone="yes"?>
<nite:root nite:id="ES2004a.abssumm" xmlns:nite="{NITE}">
   <abstract nite:id="ES2004a.abstract.1">
      <sentence nite:id="ES2004a.s.1">The project manager opened the meeting.</sentence>
      <sentence nite:id="ES2004a.s.2">The team discussed the price of the remote.</sentence>
   </abstract>
   <actions nite:id="ES2004a.actions.1">
      <sentence nite:id="ES2004a.s.3">The designer will draft the buttons.</sentence>
   </actions>
   <decisions nite:id="ES2004a.decisions.1">
      <sentence nite:id="ES2004a.s.4">The remote will cost 25 euros.</sentence>
   </decisions>
   <problems nite:id="ES2004a.problems.1"/>
</nite:root>
"""
ES2004A_REFERENCE = ("Abstract: The project manager opened the meeting. The team discussed the price of the remote.\n\n"
                     "Actions:\n- The designer will draft the buttons.\n\n"
                     "Decisions:\n- The remote will cost 25 euros.")


def write_ami(root: Path) -> Path:
    """DIR with ES2004a (Mix-Headset in the download layout, summary) and TS3003c (four headsets)."""
    for meeting, speakers in (("ES2004a", ES2004A_WORDS), ("TS3003c", TS3003C_WORDS)):
        for speaker, elements in speakers.items():
            path = root / "words" / f"{meeting}.{speaker}.words.xml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_words_xml(meeting, speaker, elements), encoding="iso-8859-1")
    (root / "abstractive").mkdir()
    (root / "abstractive" / "ES2004a.abssumm.xml").write_text(ES2004A_ABSTRACT, encoding="iso-8859-1")
    write_wav(root / "amicorpus" / "ES2004a" / "audio" / "ES2004a.Mix-Headset.wav", 1.0, 300)
    for k in range(4):
        write_wav(root / f"TS3003c.Headset-{k}.wav", 0.5, 200 + 100 * k)
    rows = [{"meeting": "ES2004a", "instructions": ["Summarize the meeting.", "List the decisions as bullets."]},
            {"meeting": "TS3003c", "instruction": "Who greeted whom?", "format": "text"},
            {"meeting": "ES2014b", "instruction": "Not in the selection."}]
    (root / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_jsonl_benchmark(path: Path, items: list[dict]) -> Path:
    """A 16 kHz tone per item under path's folder and the manifest at `path`."""
    rows = []
    for i, item in enumerate(items):
        seconds = item.pop("seconds", 1.0)
        write_wav(path.parent / "audio" / f"{item['id']}.wav", seconds, 220 + 60 * i)
        rows.append({"audio_filepath": f"audio/{item['id']}.wav", "duration": seconds, **item})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_audio_checkpoint(directory: Path, seed: int, stop_word: str | None = None) -> Path:
    """A tiny random audio SpeechLM (1 encoder block, 2 decoder layers) with its toy tokenizer.

    Its untied LM head can only emit whole-word pieces (" budget"): the other rows are zero, so
    greedy outputs are words, and loops are word loops ("budget budget budget"), as in a real
    model. With `stop_word`, the <|end|> row is 1.01 x that word's row: the output stops where
    the word would have come (an EOS to cut at); without it, outputs run to max_new_tokens.
    """
    tokenizer = train_sentencepiece(corpus(), directory.parent / f"spm_{directory.name}" / "toy", vocab_size=300)
    config = toy(**config_token_ids(tokenizer))
    config = dataclasses.replace(
        config,
        decoder=dataclasses.replace(config.decoder, hidden_size=64, intermediate_size=128, num_layers=2,
                                    num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False),
        encoder=EncoderConfig(hidden_size=32, intermediate_size=64, num_blocks=1, num_heads=2, nemo_conv_channels=8,
                              ext_pw_out_channel=32, depthwise_separable_out_channel=32, bias_max_distance=20),
    )
    torch.manual_seed(seed)
    model = SpeechLM(config)
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    with torch.no_grad():
        head = model.decoder.lm_head.weight  # (V, hidden)
        head.normal_(0.0, 1.0)
        head[[i for i, p in enumerate(pieces) if not (p.startswith(" ") and p.strip().isalpha())]] = 0.0
        if stop_word is not None:
            head[tokenizer.special_ids["end"]] = 1.01 * head[pieces.index(f" {stop_word}")]
    save_pretrained(model, directory)
    shutil.copy2(tokenizer.path, directory / "tokenizer.model")
    return directory
