import json
import subprocess
import sys

import pytest
from PIL import Image

from helpers import REPO, files_under
from jaxgen.cli import main


def _run(capsys, *argv):
  with pytest.raises(SystemExit) as e:
    main(list(argv))
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def test_help_says_what_each_command_does(capsys):
  code, out, _ = _run(capsys, "--help")
  assert code == 0 and "train" in out and "sample" in out and "eval" in out
  code, out, _ = _run(capsys, "train", "--help")
  assert code == 0 and "--config.KEY=VALUE" in out and "resumes" in out
  code, out, _ = _run(capsys, "sample", "--help")
  assert code == 0 and "options for task 'vae'" in out and "--pairs" in out
  r = subprocess.run([sys.executable, "-m", "jaxgen", "--help"], capture_output=True, text=True)
  assert r.returncode == 0 and "jaxgen" in r.stdout


def test_help_and_a_mistyped_command_answer_without_loading_jax():
  """`jaxgen --help`, the jax-free commands' --help and a typo answer without importing JAX
  (2.6 s against 0.1 s here)."""
  script = (
      "import sys\n"
      "from jaxgen.cli import main\n"
      "for argv in (['--help'], ['train', '--help'], ['caption', '--help'], ['vary', '--help'],"
      " ['trian']):\n"
      "  try:\n"
      "    main(argv)\n"
      "  except SystemExit as e:\n"
      "    print(argv[0], e.code, file=sys.stderr)\n"
      "print('jax loaded:', 'jax' in sys.modules)\n")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
  assert "jax loaded: False" in r.stdout, r.stdout + r.stderr
  assert "invalid choice: 'trian'" in r.stderr and "trian 2" in r.stderr
  assert "--beam" in r.stdout and "--num" in r.stdout  # caption's and vary's own options


def test_unknown_allocator_setting_is_named_before_any_work(capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("JAXGEN_MALLOC", "tcmalloc")
  code, _, err = _run(capsys, "verify", "--workdir", str(tmp_path))
  assert code == 2 and "Traceback" not in err
  assert "JAXGEN_MALLOC must be 'keep' (the default) or 'system', got 'tcmalloc'" in err


@pytest.mark.parametrize("args, message", [
    (["--config.optim.lrr=1"], "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
    (["--config.train.num_steps", "many"], "expects int, got 'many'"),
])
def test_bad_override_fails_before_any_compute(capsys, tmp_path, args, message):
  code, _, err = _run(capsys, "train", "--config", f"{REPO}/configs/vae.py:smoke", "--workdir",
                      str(tmp_path / "w"), *args)
  assert code == 2 and message in err and "Traceback" not in err
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_train_sample_eval_from_the_command_line(capsys, tmp_path):
  wd = tmp_path / "w"
  assert main(["train", "--config", f"{REPO}/configs/vae.py:smoke", "--workdir", str(wd),
               "--no-progress"]) is None
  main(["sample", "--workdir", str(wd), "--num", "9", "--pairs", "2", "--steps", "5"])
  printed = capsys.readouterr().out.split()
  assert sorted(p.rsplit("/", 1)[1] for p in printed) == [
      "interpolations.png", "prior_samples.png", "reconstructions.png"]
  with Image.open(wd / "samples" / "interpolations.png") as im:
    assert im.size[0] > im.size[1] > 0  # a strip: 7 columns (2 originals + 5 steps)
  main(["eval", "--workdir", str(wd), "--limit", "16"])
  metrics = json.loads(capsys.readouterr().out)
  assert metrics["step"] == 4 and metrics["num_images"] == 16
  assert metrics == json.loads((wd / "eval_step4.json").read_text())
  # --help on a workdir lists the options of its task only.
  code, out, _ = _run(capsys, "sample", "--workdir", str(wd), "--help")
  assert code == 0 and "options of this workdir's task (vae)" in out and "--pairs" in out
  assert "--sampler" not in out and "--prompt" not in out
  code, out, _ = _run(capsys, "eval", "--help", "--workdir", str(wd))
  assert code == 0 and "--limit" in out and "--baselines" not in out
  before = files_under(wd / "checkpoints")
  code, _, err = _run(capsys, "sample", "--workdir", str(tmp_path / "missing"))
  assert code == 1 and "has no config.json" in err
  assert files_under(wd / "checkpoints") == before
