"""Does a CLIP run understand caption words that no training caption used? The word tokenizer
(vocabulary = the training captions' words) against byte-level BPE learned from the same
captions (issue 15, item 6).

Two caption sets. The captioned shapes have a closed vocabulary: every held-out word is also a
training word. The free-form set made here (`phrases`) names 1,328 Fashion-MNIST pictures of the
embedded subset (1,200 train, 128 held out) by phrases: noun synonyms and inflections per class,
a brightness word read from the picture, several templates. Held-out phrases also draw from word
forms that no training phrase uses ("sneakers" where training says "sneaker" or "trainer",
"charcoal" where it says "dark"), as a user's own caption set does.

python benchmarks/tokenizer_choice.py phrases --out /tmp/phrases.npz
P="--config.data.source=npz --config.data.path=/tmp/phrases.npz"
P="$P --config.model.text.context_length=32 --config.train.num_steps=400"
jaxgen train --config configs/clip.py:fashion,words --workdir runs/tok_phrases_words $P
jaxgen train --config configs/clip.py:fashion --workdir runs/tok_phrases_bpe $P
jaxgen train --config configs/clip.py:words --workdir runs/clip_neg_bi
jaxgen train --config configs/clip.py --workdir runs/tok_shapes_bpe
python benchmarks/tokenizer_choice.py report runs/clip_neg_bi runs/tok_shapes_bpe \\
    runs/tok_phrases_words runs/tok_phrases_bpe
python benchmarks/tokenizer_choice.py phrases --out /tmp/phrases1000.npz --num-test 1000
python benchmarks/tokenizer_choice.py report runs/tok_phrases_words runs/tok_phrases_bpe \\
    --data-path /tmp/phrases1000.npz --stem tokenizers_phrases1000

The report (benchmarks/results/tokenizers.{json,md}) gives per run, on its held-out split: the
share of caption words that become an unknown token, distinct captions against distinct token
sequences, zero-shot accuracy (shape and colour on the shapes; class from the npz's class names
on the phrases), image<->text R@1, and the same R@1 on the held-out captions holding a word that
no training caption has ("novel") and on the others. With labels, also how often a caption's
nearest held-out picture shows its class ("t2i_class@1"), for captions of known words, captions
whose new words extend a training word ("inflected": "sneakers", "greyish") and captions with a
new word that does not ("new": "frock", "kicks").
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import write

from jaxgen import app, runtime
from jaxgen.commands import evaluate_dual_encoder
from jaxgen.data import load_all, load_source
from jaxgen.data.sources import FASHION_MNIST_CLASSES
from jaxgen.eval.retrieval import dual_encoder_metrics
from jaxgen.pipelines import clip as pipe

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Per Fashion-MNIST class: noun forms used in training phrases, and forms only held-out phrases
# use (inflections, compounds, synonyms).
NOUNS = (
    (("t-shirt", "tee", "top"), ("t-shirts", "tees", "tshirt", "tank top")),
    (("trousers", "pants"), ("trouser", "jeans", "slacks", "sweatpants")),
    (("pullover", "sweater", "jumper"), ("pullovers", "sweaters", "jumpers", "sweatshirt")),
    (("dress", "gown"), ("dresses", "sundress", "gowns", "frock")),
    (("coat", "jacket"), ("coats", "jackets", "overcoat", "raincoat")),
    (("sandal", "sandals"), ("flip-flops", "slides", "sandalwood-coloured sandal", "flipflop")),
    (("shirt", "blouse"), ("shirts", "blouses", "button-up shirt", "overshirt")),
    (("sneaker", "trainer"), ("sneakers", "trainers", "running shoe", "kicks")),
    (("bag", "handbag"), ("bags", "handbags", "purse", "tote")),
    (("ankle boot", "boot"), ("boots", "ankle-boots", "booties", "bootie")),
)
# Brightness of the garment (mean of its pixels), dark / mid / light terciles.
SHADES = (
    (("dark", "black"), ("darker", "charcoal", "blackish", "jet-black")),
    (("grey", "gray"), ("greyish", "grayish", "mid-grey", "silvery")),
    (("light", "white"), ("pale", "whitish", "bright", "lighter")),
)
TEMPLATES = (("a {s} {n}", "{s} {n}", "a photo of a {s} {n}", "picture of a {s} {n}",
              "my {s} {n}"),
             ("an image showing a {s} {n}", "this {s} {n} is for sale", "someone's {s} {n}"))


def _phrases(labels, shades, rng, novel: float) -> np.ndarray:
  """One phrase per picture; each word form and template from the second (held-out only) list
  with probability `novel`."""
  pick = lambda pair: rng.choice(pair[int(rng.random() < novel)])
  return np.array([pick(TEMPLATES).format(s=pick(SHADES[s]), n=pick(NOUNS[y]))
                   for y, s in zip(labels, shades)])


def make_phrases(out: str, num_train: int = 1200, num_test: int = 128, seed: int = 0) -> dict:
  """Writes the free-form caption set as an npz jaxgen reads (data.source=npz)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", num_train), ("test", num_test)):
    src = load_source(app.load_config(f"{ROOT / 'configs/clip.py'}:fashion").data, split)
    data = load_all(src)
    idx = np.sort(rng.choice(len(data["image"]), n, replace=False))
    images, labels = data["image"][idx], data["label"][idx]
    fg = images.astype(np.float32)[..., 0]
    mean = np.array([im[im > 20].mean() if (im > 20).any() else 0.0 for im in fg])
    shades = np.digitize(mean, np.quantile(mean, [1 / 3, 2 / 3]))  # terciles of this split
    arrays[f"{split}_images"] = images
    arrays[f"{split}_labels"] = labels
    novel = 0.3 if split == "test" else 0.0
    arrays[f"{split}_captions"] = _phrases(labels, shades, rng, novel=novel)
  arrays["class_names"] = np.array(FASHION_MNIST_CLASSES)
  np.savez_compressed(out, **arrays)
  train_words = {w for c in arrays["train_captions"] for w in c.split()}
  test_words = [w for c in arrays["test_captions"] for w in c.split()]
  return dict(path=out, train=num_train, test=num_test,
              held_out_words_not_in_training=float(np.mean([w not in train_words
                                                            for w in test_words])))


def _unknown(tokenizer, word: str) -> bool:
  return tokenizer.unk_id in tokenizer.encode(word)


def report_row(workdir: str, data_path: str | None = None) -> dict:
  run = app.restore_run(workdir)
  c = run.config
  if data_path and c.data.source == "npz":  # the same training set, another held-out split
    c.data.path = data_path
  model, params = run.task.model, run.params
  tok = model.tokenize
  test = load_all(load_source(c.data, c.data.eval_split))
  train = load_all(load_source(c.data, c.data.train_split))
  captions = [str(x) for x in test["caption"]]
  train_words = {w for t in train["caption"] for w in str(t).split()}
  words = [w for t in captions for w in t.split()]
  ids = tok(captions, truncate=True)["input_ids"]
  row = dict(run=workdir, data=c.data.name if c.data.source == "embedded" else c.data.path,
             tokenizer=c.model.text.tokenizer, vocab=int(getattr(tok, "vocab_size", 0)),
             step=run.step, held_out=len(captions),
             words_not_in_training=float(np.mean([w not in train_words for w in words])),
             unknown_words=float(np.mean([_unknown(tok, w) for w in words])),
             distinct_captions=len(set(captions)),
             distinct_token_sequences=len({tuple(r) for r in np.asarray(ids)}))
  m = evaluate_dual_encoder(run.task, params, run.model_state)
  for k in ("zero_shot_shape", "zero_shot_colour", "zero_shot_class", "i2t_recall@1",
            "t2i_recall@1", "t2i_recall@5", "i2t_chance@1"):
    if k in m:
      row[k] = m[k]
  novel = np.array([any(w not in train_words for w in t.split()) for t in captions])
  embed_images = lambda x: pipe.embed_images(model, params, run.model_state, x)
  embed_texts = lambda t: pipe.embed_texts(model, params, t)
  if "label" in test:  # does each caption's nearest picture show the caption's class?
    nearest = np.argmax(embed_texts(captions) @ embed_images(test["image"]).T, axis=1)
    right = test["label"][nearest] == test["label"]
    # A new word that extends a training word ("sneakers", "greyish") against a new word.
    extends = lambda w: any(w.startswith(t) for t in train_words if len(t) >= 3)
    new_words = [[w for w in t.split() if w not in train_words] for t in captions]
    parts = dict(known=~novel,
                 inflected=np.array([bool(n) and all(map(extends, n)) for n in new_words]),
                 new=np.array([any(not extends(w) for w in n) for n in new_words]))
    for part, mask in parts.items():
      row[f"{part}_captions"] = int(mask.sum())
      row[f"{part}_t2i_class@1"] = float(right[mask].mean()) if mask.any() else float("nan")
  for part, mask in (("novel", novel), ("known", ~novel)):
    row[f"{part}_captions"] = int(mask.sum())
    if mask.sum() > 1:
      sub = dual_encoder_metrics(embed_images, embed_texts, test["image"][mask],
                                 np.array(captions)[mask])
      row[f"{part}_t2i_recall@1"] = sub["t2i_recall@1"]
      row[f"{part}_i2t_recall@1"] = sub["i2t_recall@1"]
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  ph = sub.add_parser("phrases", help="write the free-form caption set")
  ph.add_argument("--out", default="/tmp/phrases.npz")
  ph.add_argument("--num-test", type=int, default=128, help="held-out pictures")
  rp = sub.add_parser("report", help="evaluate trained clip runs")
  rp.add_argument("workdirs", nargs="+")
  rp.add_argument("--data-path", help="npz runs: read this set instead (same training split)")
  rp.add_argument("--stem", default="tokenizers", help="results file name")
  args = p.parse_args()
  runtime.setup_logging()
  if args.cmd == "phrases":
    print(make_phrases(args.out, num_test=args.num_test))
    return
  rows = [report_row(wd, args.data_path) for wd in args.workdirs]
  cols = ["run", "tokenizer", "vocab", "held_out", "words_not_in_training", "unknown_words",
          "distinct_captions", "distinct_token_sequences", "zero_shot_shape", "zero_shot_colour",
          "zero_shot_class", "i2t_recall@1", "t2i_recall@1", "novel_captions",
          "novel_t2i_recall@1", "known_t2i_recall@1", "known_t2i_class@1", "inflected_captions",
          "inflected_t2i_class@1", "new_captions", "new_t2i_class@1"]
  path, table = write(args.stem, rows, cols, dict(command=" ".join(sys.argv)))
  print(table)
  print("wrote", path)


if __name__ == "__main__":
  main()
