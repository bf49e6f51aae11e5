"""User errors of the `lsef` command: each ends with exit status 2 and one line on stderr,
``lsef: error: ...``, naming the flag, file or folder at fault; no traceback unless --debug.

Most cases call the CLI's ``main(argv)`` in this process (they fail before any training); a few
run the command as users do, in a subprocess. The threads chooser and the parser's manners
(help text with defaults, --version, no heavy imports) are tested here too.
"""

import importlib.metadata
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import lsef_cli as cli

CUDA = torch.cuda.is_available()
CWD = tempfile.gettempdir()  # outside the source tree, as users run it
TINY = ["--n-train", "16", "--n-test", "8", "--batch-size", "8", "--d-model", "8"]
TINY += ["--epochs", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    """In-process runs may set torch's thread count: restore it for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_main(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *names):
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lsef: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])


def feature_folder(root, labels="clip,label,split\n", clips=()):
    import numpy as np

    (root / "features").mkdir(parents=True)
    (root / "labels.csv").write_text(labels)
    for name in clips:
        np.save(root / "features" / f"{name}.npy", np.random.rand(8, 6).astype("float32"))
    return root


# Usage errors found by the parser: (argv, what the one line must contain).
PARSER_CASES = [
    (["train", "--frames", "0"], "argument --frames: expected an integer >= 2, got 0"),
    (["train", "--epochs", "-1"], "argument --epochs: expected an integer >= 1, got -1"),
    (["train", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    (["train", "--batch-size", "-8"], "argument --batch-size: expected an integer >= 1, got -8"),
    (["train", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["train", "--d-model", "0"], "argument --d-model: expected an integer >= 1, got 0"),
    (["train", "--rank", "0"], "argument --rank: expected an integer >= 1, got 0"),
    (["train", "--n-train", "0"], "argument --n-train: expected an integer >= 1, got 0"),
    (["train", "--n-test", "-3"], "argument --n-test: expected an integer >= 1, got -3"),
    (["train", "--dim", "sixty"], "argument --dim: expected an integer >= 1, got 'sixty'"),
    (["train", "--frames", "2.5"], "argument --frames: expected an integer >= 2, got '2.5'"),
    (["train", "--lr", "0"], "argument --lr: expected a finite number > 0, got 0"),
    (["train", "--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    (["train", "--lr", "fast"], "argument --lr: expected a finite number > 0, got 'fast'"),
    (["train", "--weight-decay", "-0.1"], "argument --weight-decay: expected a finite number >= 0"),
    (["train", "--weight-decay", "inf"], "argument --weight-decay: expected a finite number >= 0"),
    (["train", "--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got -1"),
    (["demo", "--seed", str(2**40)], "argument --seed: expected an integer in [0, 4294967295]"),
    (["train", "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["train", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    (["train", "--ops", "fast"], "argument --ops: invalid choice: 'fast'"),
    (["demo", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["bench", "--threads", "-2"], "argument --threads: expected an integer >= 1, got -2"),
    (["train", "--threads", "many"], "argument --threads: expected an integer >= 1, got 'many'"),
    (["bench", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["train", "--resume", "--overwrite"], "argument --overwrite: not allowed with argument"),
    (["train", "--frames"], "argument --frames: expected one argument"),
    (["train", "--nope"], "unrecognized arguments: --nope"),
    (["nope"], "argument COMMAND: invalid choice: 'nope'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize("argv, said", PARSER_CASES, ids=[" ".join(a) for a, _ in PARSER_CASES])
def test_parser_refuses_values_that_make_no_sense(capsys, argv, said):
    rc, out, err = run_main(capsys, argv)
    assert_user_error(rc, err, said, "--help")
    assert out == ""


def test_train_refuses_bad_folders_and_combinations(capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    no_labels = tmp_path / "no-labels"
    no_labels.mkdir()
    bad_column = feature_folder(tmp_path / "bad-column", "clip,emotion,split\nc0,a,train\n", ["c0"])
    leaves = feature_folder(tmp_path / "leaves", "clip,label,split\n../x,a,train\n")
    no_val = feature_folder(
        tmp_path / "no-val", "clip,label,split\nc0,a,train\nc1,b,train\n", ["c0", "c1"]
    )
    held = tmp_path / "held"
    held.mkdir()
    (held / "metrics.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(tmp_path / "missing")], [f"--data {tmp_path / 'missing'}: no such folder"]),
        (["--data", str(a_file)], [f"--data {a_file}: is not a folder"]),
        (["--data", str(no_labels)], [str(no_labels / "labels.csv"), "not found"]),
        (["--data", str(bad_column)], [str(bad_column / "labels.csv"), "lacks column(s)"]),
        (["--data", str(leaves)], [str(leaves / "labels.csv"), "line 2", "'../x'"]),
        (["--data", str(no_val)], [str(no_val), "no val split and too few training clips (2)"]),
        (["--frames", "3"], ["--frames 3: the synthetic data needs at least 4 frames"]),
        (["--dim", "8"], ["synthetic data (", "--dim 8", "D must be >="]),
        (["--resume"], ["--resume needs --out DIR"]),
        (["--accept-changes", "--out", str(empty)], ["--accept-changes", "add --resume"]),
        (
            ["--resume", "--out", str(tmp_path / "gone")],
            [f"no checkpoint at {tmp_path / 'gone' / 'checkpoint.pt'}", "does not exist"]
            + ["start it without --resume"],
        ),
        (
            ["--resume", "--out", str(held)],
            [f"no checkpoint at {held / 'checkpoint.pt'}, but {held} holds metrics.json"]
            + ["start the run again with --overwrite"],
        ),
        (["--out", str(a_file)], [f"out folder {a_file} exists and is not a folder"]),
        (["--out", str(a_file / "run")], [f"cannot create the out folder {a_file / 'run'}"]),
        (
            ["--out", str(held)],
            [f"out folder {held} already holds a run", "--resume", "--overwrite"],
        ),
    ]
    for args, names in cases:
        rc, out, err = run_main(capsys, ["train", *TINY, *args])
        assert_user_error(rc, err, *names)
        assert "epoch 1" not in out  # refused before anything trained
    assert list(held.iterdir()) == [held / "metrics.json"]  # nothing written into a held folder


def test_train_names_a_damaged_foreign_or_unfitting_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, ["train", *TINY, "--out", str(run)])
    assert rc == 0, err
    assert f"run folder {run}: checkpoint.pt after every epoch" in out
    ckpt = run / "checkpoint.pt"
    good = ckpt.read_bytes()
    resume = ["train", *TINY, "--epochs", "2", "--out", str(run), "--resume"]
    for extra, names in [
        (["--lr", "0.001"], ["lr=0.002; this run has lr=0.001", "--accept-changes", str(ckpt)]),
        (["--ops", "ref"], ["ops='ext'; this run has ops='ref'", "--accept-changes"]),
        (["--d-model", "16"], [f"checkpoint {ckpt} has d_model=8, this run has d_model=16"]),
        (["--rao"], ["has rao=False, this run has rao=True"]),
        (["--model", "lsef-no-cim"], ["has model='lsef', this run has model='lsef-no-cim'"]),
        (["--dim", "80", "--accept-changes"], [f"checkpoint {ckpt} does not fit this run"]),
    ]:
        rc, out, err = run_main(capsys, resume + extra)
        assert_user_error(rc, err, *names)
    ckpt.write_bytes(good[: len(good) // 2])  # cut short, as by a full disk
    rc, out, err = run_main(capsys, resume)
    assert_user_error(rc, err, f"cannot read checkpoint {ckpt}", "damaged")
    ckpt.write_bytes(b"not a checkpoint at all")
    rc, out, err = run_main(capsys, resume)
    assert_user_error(rc, err, f"cannot read checkpoint {ckpt}")
    torch.save({"weights": torch.zeros(2)}, ckpt)
    rc, out, err = run_main(capsys, resume)
    assert_user_error(rc, err, f"{ckpt} was written by an older lsef_ext (no format number)")
    torch.save({"format": 2, "weights": torch.zeros(2)}, ckpt)
    rc, out, err = run_main(capsys, resume)
    assert_user_error(rc, err, f"{ckpt} is not a checkpoint of lsef train (missing config")


def test_train_resume_and_overwrite_do_what_they_say(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_main(capsys, ["train", *TINY, "--out", str(run)])[0] == 0
    rc, out, err = run_main(
        capsys, ["train", *TINY, "--epochs", "2", "--out", str(run), "--resume"]
    )
    assert rc == 0, err
    assert "(resumed)" in out and "  epoch 2 " in out
    rc, out, err = run_main(capsys, ["train", *TINY, "--out", str(run), "--resume"])
    assert rc == 0 and "the run already has 2 epochs (--epochs 1): none to add" in out
    # --accept-changes continues with the new learning rate
    rc, out, err = run_main(
        capsys,
        ["train", *TINY, "--epochs", "3", "--out", str(run), "--resume", "--lr", "1e-3"]
        + ["--accept-changes"],
    )
    assert rc == 0, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["lr"] == 1e-3
    # --overwrite starts again at epoch 1
    rc, out, err = run_main(capsys, ["train", *TINY, "--out", str(run), "--overwrite"])
    assert rc == 0, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_train_resume_of_a_run_stopped_before_its_first_checkpoint(capsys, tmp_path):
    """Only checkpoint.pt.tmp is there (the run was killed while saving epoch 1): --resume
    says there is nothing to resume and starts from epoch 0; a plain run takes the folder as
    empty."""
    done = tmp_path / "done"
    assert run_main(capsys, ["train", *TINY, "--out", str(done)])[0] == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt.tmp").write_bytes((done / "checkpoint.pt").read_bytes()[:500])
    rc, out, err = run_main(capsys, ["train", *TINY, "--out", str(run), "--resume"])
    assert rc == 0, err
    said = (
        f"resume: nothing to resume in {run} (no checkpoint.pt; the earlier run stopped before "
        "its first epoch ended): starting from epoch 0\n"
    )
    assert out.startswith(said) and out.count("nothing to resume") == 1, out
    assert "(resumed)" not in out and "  epoch 1 " in out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # resumed for real the next time
    rc, out, err = run_main(
        capsys, ["train", *TINY, "--epochs", "2", "--out", str(run), "--resume"]
    )
    assert rc == 0 and "(resumed)" in out and "nothing to resume" not in out, err
    # a plain run on a folder holding only a stale *.tmp
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "checkpoint.pt.tmp").write_bytes(b"")
    rc, out, err = run_main(capsys, ["train", *TINY, "--out", str(stale)])
    assert rc == 0, err
    assert torch.load(stale / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_train_help_says_how_ties_and_resumes_are_handled(capsys):
    rc, out, err = run_main(capsys, ["train", "--help"])
    assert rc == 0, err
    text = " ".join(out.split())
    assert (
        "an equal score is decided by the val loss (lower wins), and equal in both by the "
        "later epoch" in text
    )
    assert "has nothing to resume: the run starts from epoch 0" in text


def test_train_without_out_says_nothing_is_saved(capsys):
    rc, out, err = run_main(capsys, ["train", *TINY, "--epochs", "1"])
    assert rc == 0, err
    assert "no --out: nothing is saved" in out and "checkpoint and metrics in" not in out


def test_bench_and_demo_refuse_bad_requests(capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (["bench", "--filter", "no such case"], ["--filter 'no such case' matches no case"]),
        (["bench", "--json", str(tmp_path / "nope" / "b.json")], ["--json", "does not exist"]),
        (["bench", "--json", str(tmp_path)], [f"--json {tmp_path}: is a folder"]),
        (["demo", "--out", str(a_file)], [f"--out {a_file}: exists and is not a folder"]),
        (["demo", "--out", str(a_file / "sub")], [f"--out {a_file / 'sub'}: cannot create"]),
    ]
    if not CUDA:
        cases += [
            (["bench", "--device", "cuda"], ["--device cuda: no CUDA device is available"]),
            (["demo", "--device", "cuda"], ["--device cuda: no CUDA device is available"]),
            (["train", "--device", "cuda:1"], ["--device cuda:1: no CUDA device is available"]),
        ]
    for argv, names in cases:
        rc, out, err = run_main(capsys, argv)
        assert_user_error(rc, err, *names)
    assert not (tmp_path / "nope").exists()


def test_debug_shows_the_traceback(capsys, tmp_path):
    for argv in (
        ["--debug", "train", "--data", str(tmp_path / "missing")],
        ["train", "--data", str(tmp_path / "missing"), "--debug"],
    ):
        with pytest.raises(cli.UserError, match="--data .*missing: no such folder"):
            cli.main(argv)


def test_bugs_keep_their_traceback_and_an_interrupt_is_one_line(capsys, monkeypatch):
    def bug(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli, "_info", bug)
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        cli.main(["info"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    rc, out, err = run_main(capsys, ["info"])
    assert rc == 130 and err == "lsef: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--debug", "info"])


# --------------------------------------------------------------------------------------------
# as users run it: subprocesses
# --------------------------------------------------------------------------------------------


def lsef(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lsef_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=CWD, env=env)


def test_subprocess_user_errors_are_one_line(tmp_path):
    for args, said in [
        (["train", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (["train", "--data", str(tmp_path / "x")], f"--data {tmp_path / 'x'}: no such folder"),
        (["bench", "--filter", "zzz", "--threads", "1"], "--filter 'zzz' matches no case"),
    ]:
        r = lsef(*args)
        assert_user_error(r.returncode, r.stderr, said)
        assert r.stdout == ""


def test_subprocess_debug_prints_the_traceback(tmp_path):
    r = lsef("--debug", "train", "--data", str(tmp_path / "x"))
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.rstrip().endswith(f"UserError: --data {tmp_path / 'x'}: no such folder")


def test_version_and_help():
    import lsef_ext

    r = lsef("--version")
    assert r.returncode == 0 and r.stdout == f"lsef {lsef_ext.__version__}\n"
    r = lsef("train", "--help")
    assert r.returncode == 0 and "--accept-changes" in r.stdout and "(default: 64)" in r.stdout


# --------------------------------------------------------------------------------------------
# the parser's manners
# --------------------------------------------------------------------------------------------


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, cli.argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


def test_every_flag_has_help_and_shows_its_default():
    parser = cli.build_parser()
    switches = (cli.argparse._StoreTrueAction, cli.argparse._HelpAction)
    for name, sub in [("lsef", parser), *_subparsers(parser).items()]:
        for action in sub._actions:
            if not action.option_strings:
                continue
            assert action.help, (name, action.option_strings)
            if (
                isinstance(action, switches)
                or action.default is cli.argparse.SUPPRESS
                or action.required  # nothing to default to
            ):
                continue
            shown = sub.formatter_class(sub.prog)._get_help_string(action)
            assert "default" in shown, (name, action.option_strings, shown)


def test_model_names_match_the_models():
    from lsef_ext.nn import MODEL_NAMES

    assert cli.MODEL_NAMES == MODEL_NAMES


def test_help_and_version_import_no_torch():
    # `lsef --help` must be quick: lsef_cli, its parser, every command's --help and --version
    # import nothing heavy (importing anything inside lsef_ext would load torch)
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import lsef_cli as c\n"
        "for argv in (['--help'], ['train', '--help'], ['demo', '--help'], ['bench', '--help'],\n"
        "             ['info', '--help'], ['--version']):\n"
        "    try:\n"
        "        c.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "new = sorted(m for m in set(sys.modules) - before\n"
        "             if m.startswith(('torch', 'lsef_ext', 'numpy', 'matplotlib', 'tqdm')))\n"
        "print(new, file=sys.stderr)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=CWD, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "usage: lsef train" in r.stdout and "usage: lsef info" in r.stdout
    assert r.stdout.endswith(f"\nlsef {importlib.metadata.version('lsef_ext')}\n")
    assert r.stderr.strip() == "[]"


def test_the_old_module_path_still_runs_the_command():
    # python -m lsef_ext.cli (torchrun -m lsef_ext.cli, scripts written before lsef_cli)
    import lsef_ext.cli

    assert lsef_ext.cli.main is cli.main


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------


def test_choose_threads():
    choose = cli.choose_threads
    assert choose(3, cap=1, cores=2, load=50.0) == (3, None)  # --threads wins
    assert choose(None, cap=1, cores=8, load=50.0, env="5") == (5, None)  # then OMP_NUM_THREADS
    assert choose(None, cap=None, cores=8, load=0.5, env="0") == (8, None)  # invalid: ignored
    assert choose(None, cap=None, cores=8, load=0.5, env="x") == (8, None)
    assert choose(None, cap=None, cores=8, load=None) == (8, None)  # no load average
    assert choose(None, cap=4, cores=8, load=1.0) == (4, None)  # small work
    assert choose(None, cap=16, cores=8, load=8.0) == (8, None)  # load == cores: not busy
    assert choose(None, cap=None, cores=8, load=2.0, processes=2) == (4, None)  # torchrun
    n, note = choose(None, cap=None, cores=8, load=9.5)
    assert n == 4 and note == (
        "the load average (9.5) exceeds the 8 usable cores: using 4 threads (--threads N to choose)"
    )
    n, note = choose(None, cap=4, cores=2, load=3.0)
    assert n == 1 and "(3.0) exceeds the 2 usable cores: using 1 thread " in note


def test_work_cap_and_usable_cores():
    assert cli.work_cap(64, 16, 64) == 4  # lsef train's defaults
    assert cli.work_cap(8, 16, 8) == 1  # never below one
    assert cli.work_cap(32, 16, 512) == 16
    if hasattr(os, "sched_getaffinity"):
        assert cli.usable_cores() == len(os.sched_getaffinity(0))


def test_threads_flag_sets_torch_threads(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rc, out, err = run_main(capsys, ["train", *TINY[:-2], "--threads", "2"])
    assert rc == 0, err
    assert torch.get_num_threads() == 2 and "1 process(es) of 2 thread(s)" in out
    # busy machine, no flag: one line on stderr, and fewer threads
    monkeypatch.setattr(cli, "usable_cores", lambda: 2)
    monkeypatch.setattr(cli, "_load_average", lambda: 7.0)
    rc, out, err = run_main(capsys, ["train", *TINY[:-2], "--batch-size", "64", "--d-model", "64"])
    assert rc == 0, err
    assert err == (
        "lsef: the load average (7.0) exceeds the 2 usable cores: using 1 thread "
        "(--threads N to choose)\n"
    )
    assert torch.get_num_threads() == 1


def test_export_refuses_bad_checkpoints_outs_and_untraceable_models(capsys, tmp_path, monkeypatch):
    """lsef export: a missing or damaged checkpoint, an --out that is not a writable .pt2 file,
    a bad --format, a model torch.export cannot trace: one line each, nothing written."""
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, ["train", *TINY, "--model", "meanpool-mlp", "--out", str(run)])
    assert rc == 0, err
    ckpt = str(run / "checkpoint.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint at all")
    a_dir = tmp_path / "a-folder.pt2"
    a_dir.mkdir()
    good = str(tmp_path / "model.pt2")
    cases = [
        ([str(tmp_path / "nope.pt"), "--out", good], [f"checkpoint {tmp_path / 'nope.pt'}"]),
        ([str(damaged), "--out", good], [f"cannot read checkpoint {damaged}", "damaged"]),
        ([ckpt, "--out", str(tmp_path / "m.onnx")], ["--out", "m.onnx", "ending in .pt2"]),
        ([ckpt, "--out", str(a_dir)], [f"--out {a_dir}: is a folder"]),
        (
            [ckpt, "--out", str(tmp_path / "gone" / "m.pt2")],
            [f"the folder {tmp_path / 'gone'} does not exist"],
        ),
        ([ckpt, "--format", "onnx"], ["argument --format: invalid choice: 'onnx'", "--help"]),
    ]
    for args, names in cases:
        rc, out, err = run_main(capsys, ["export", *args, "--threads", "1"])
        assert_user_error(rc, err, *names)
        assert out == ""

    import torch.export

    def untraceable(*a, **k):
        raise RuntimeError("Could not guard on data-dependent expression u0 >= 1\ndetails")

    monkeypatch.setattr(torch.export, "export", untraceable)
    rc, out, err = run_main(capsys, ["export", ckpt, "--out", good, "--threads", "1"])
    assert_user_error(
        rc,
        err,
        f"{ckpt} (meanpool-mlp): torch.export cannot trace the model: RuntimeError: Could not "
        "guard on data-dependent expression u0 >= 1",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder.pt2", "damaged.pt", "run"]


def test_amp_flag_refuses_fp16_off_cuda_and_runs_bf16(capsys, tmp_path):
    """--amp: fp16 off CUDA is one line naming --amp fp16 (train and demo), before anything is
    written; a bad choice is a usage error; bf16 on the CPU trains and says so."""
    cases = [
        (["train", *TINY, "--amp", "fp16"], ["--amp fp16 needs --device cuda", "--amp bf16"]),
        (
            ["demo", "--amp", "fp16", "--out", str(tmp_path / "demo")],
            ["--amp fp16 needs --device cuda (got --device cpu)"],
        ),
        (["train", "--amp", "fp32"], ["argument --amp: invalid choice: 'fp32'", "--help"]),
    ]
    for argv, names in cases:
        rc, out, err = run_main(capsys, argv)
        assert_user_error(rc, err, *names)
        assert out == ""
    assert not (tmp_path / "demo").exists()
    rc, out, err = run_main(capsys, ["train", *TINY, "--model", "meanpool-mlp", "--amp", "bf16"])
    assert rc == 0, err
    assert "RAO off, autocast bf16" in out and "test under clean: WAR" in out
