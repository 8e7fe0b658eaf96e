"""Hostile inputs to the commands' outputs, the experiment runner and config loading (issue 10).

Every case goes through :func:`hostile.expect_refusal`: exit 2, one ``error:`` line naming the
file, no existing file changed, nothing written outside the output folder. Cases that would
overwrite a file on a broken build work on copies (of the configs, the dataset), never on the
repository's or the session's shared files.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hostile import expect_refusal
from test_test_infer import save_random_model
from test_train import DECOUPLED, FASTER, tiny_overrides

from drcnn.config import load_config, to_dict
from drcnn.engine.distributed import device_name, resolve_device
from drcnn.errors import DrcnnError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("ckpt") / "model.pth", synthetic_root)


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    """A copy of the repository's configs (a broken build may overwrite it, not the original)."""
    return Path(shutil.copytree(REPO / "configs", tmp_path / "configs"))


@pytest.fixture
def dataset(tmp_path: Path, synthetic_root: Path) -> Path:
    """A copy of the synthetic dataset (a broken build may overwrite it, not the original)."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "dataset"))


def model_options(root: Path) -> list[str]:
    return ["--device", "cpu", "--set", *tiny_overrides(root)]


def write_spec(path: Path, root: Path, **change) -> Path:
    spec = {
        "name": "hostile",
        "dataset": {"type": "synthetic", "root": str(root)},
        "overrides": [*tiny_overrides(root), "train.max_iters=1"],  # short, should it run
        "models": [{"name": "faster", "config": str(FASTER)}],
        "steps": ["train"],
        **change,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------- infer (item 2)
def test_infer_refuses_to_draw_over_its_input_images(
    tmp_path, synthetic_root, checkpoint, capsys
) -> None:
    images = Path(shutil.copytree(synthetic_root / "val", tmp_path / "images"))
    argv = ["infer", FASTER, checkpoint, images, "--out", images, *model_options(synthetic_root)]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root, checkpoint])
    assert f"{images / '000000.png'}: the drawing would overwrite the input image" in err


def test_infer_never_overwrites_a_file_it_did_not_write(
    tmp_path, synthetic_root, checkpoint, capsys
) -> None:
    image = synthetic_root / "val" / "000000.png"
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000.png").write_bytes(b"the user's own file")
    argv = ["infer", FASTER, checkpoint, image, "--out", out, *model_options(synthetic_root)]
    watch = [tmp_path, synthetic_root, checkpoint]
    err = expect_refusal(argv, capsys, watch)
    assert err.startswith(f"error: {out / '000000.png'}: exists and is not a drawing of an")
    (out / "000000.png").unlink()
    (out / "detections.json").write_text('{"the user": "own file"}')
    err = expect_refusal(argv, capsys, watch)
    assert err.startswith(f"error: {out / 'detections.json'}: exists and is not the detections")


# ------------------------------------------------------------------ test, benchmark (item 6)
def test_test_outputs_never_collide_with_each_other_or_the_inputs(
    tmp_path, configs, dataset, capsys
) -> None:
    config = configs / "synthetic" / "faster_rcnn_r18_fpn_synthetic.yaml"
    checkpoint = save_random_model(tmp_path / "model.pth", dataset)
    ann = dataset / "annotations" / "instances_val.json"
    base = ["test", config, checkpoint, *model_options(dataset)]
    watch = [tmp_path]
    cases = {
        tmp_path / "res" / "metrics.json": "the metrics file would overwrite the result file",
        checkpoint: "the result file would overwrite the checkpoint",
        config: "the result file would overwrite the config file",
        ann: "the result file would overwrite the annotation file",
    }
    for out, message in cases.items():
        err = expect_refusal([*base, "--out", out], capsys, watch)
        assert err.startswith(f"error: {out}: {message}"), err

    # drawings named <image id>.png into a folder of images named that way
    gt = json.loads(ann.read_text())
    for image in gt["images"]:
        name = f"{image['id']}.png"
        (dataset / "val" / image["file_name"]).rename(dataset / "val" / name)
        image["file_name"] = name
    ann.write_text(json.dumps(gt))
    argv = [*base, "--out", tmp_path / "res" / "r.json", "--show", dataset / "val"]
    err = expect_refusal(argv, capsys, watch)
    assert "a drawing would overwrite the image" in err


def test_benchmark_refuses_to_write_over_its_checkpoint(tmp_path, synthetic_root, capsys) -> None:
    checkpoint = save_random_model(tmp_path / "model.pth", synthetic_root)
    argv = ["benchmark", FASTER, checkpoint, "--images", "1", "--out", checkpoint]
    err = expect_refusal(argv, capsys, watch=[tmp_path])
    assert err.startswith(f"error: {checkpoint}: --out would overwrite the checkpoint")


@pytest.mark.parametrize("command", ["test", "infer", "benchmark"])
@pytest.mark.parametrize(("option", "value"), [("--amp", "fp8"), ("--device", "tpu")])
def test_bad_amp_and_device_values(
    tmp_path, synthetic_root, checkpoint, capsys, command, option, value
) -> None:
    """Issue 13: an unknown --amp mode or --device is one line, before anything is written."""
    out = tmp_path / "out"
    argv = {
        "test": ["test", FASTER, checkpoint, "--out", out / "r.json"],
        "infer": ["infer", FASTER, checkpoint, synthetic_root / "val", "--out", out],
        "benchmark": ["benchmark", FASTER, checkpoint, "--images", "1", "--out", out / "b.json"],
    }[command]
    options = ["--set", *tiny_overrides(synthetic_root)]
    options = [*options, "--device", "cpu"] if option == "--amp" else options
    watch = [tmp_path, checkpoint, synthetic_root]
    err = expect_refusal([*argv, *options, option, value], capsys, watch)
    assert err.startswith(f"error: {option}") and value in err


# -------------------------------------------------------- run: lock, names, specs (5, 14, 15)
def test_a_second_run_on_the_same_folder_is_refused(tmp_path, synthetic_root, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        spec = write_spec(tmp_path / "spec.yaml", synthetic_root)
        err = expect_refusal(["run", spec, "--out", out], capsys, watch=[tmp_path])
        assert err == (
            f"error: {out}: another drcnn run (pid {holder.pid}) is using this folder; "
            "wait for it to end or choose another --out"
        )
    finally:
        holder.communicate("")  # closing its stdin ends it


HOLD_LOCK = """
import fcntl, os, sys
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.truncate(0)
handle.write(f"{os.getpid()}\\n")
handle.flush()
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "../escape"}, "name '../escape': use letters, digits, _ . - (a folder name)"),
        ({"name": "/tmp/escape"}, "name '/tmp/escape': use letters"),
        ({"models": [{"name": "a\n", "config": str(FASTER)}]}, "model name 'a\\n': use letters"),
        ({"models": [{"name": "a"}]}, "models[0].config: missing"),
        ({"models": [{"config": str(FASTER)}]}, "models[0].name: missing"),
        ({"name": "${oc.env:HOME}"}, "key 'name': interpolations (${...}) are not supported"),
        ({"device": "tpu"}, "device: expected cpu, cuda, cuda:N or auto, got 'tpu'"),
        (
            {"models": [{"name": "a", "config": str(FASTER), "overrides": ["train.lr=${x}"]}]},
            "key 'models[0].overrides[0]': interpolations",
        ),
    ],
)
def test_bad_spec_names_and_values(
    tmp_path, synthetic_root, monkeypatch, change, message, capsys
) -> None:
    """Without --out the run goes to experiments/runs/<name> under the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, **change)
    err = expect_refusal(["run", spec], capsys, watch=[tmp_path, synthetic_root])
    assert err.startswith(f"error: spec {spec}: ") and message in err, err


# ------------------------------------------------------------------ config files (item 15)
@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"top.yaml": "_base_: 5\n"}, "top.yaml: _base_: expected a file name or a list of"),
        ({"top.yaml": "_base_: [a.yaml, 3]\n"}, "top.yaml: _base_: expected a file name or a"),
        (
            {"top.yaml": "_base_: base.yaml\n", "base.yaml": "train:\n  lr: ${train.momentum}\n"},
            "base.yaml: key 'train.lr': interpolations (${...}) are not supported",
        ),
        (
            {"top.yaml": "model:\n  rpn:\n    nms_thresh: [0.7, '${oc.env:X}']\n"},
            "top.yaml: key 'model.rpn.nms_thresh[1]': interpolations",
        ),
    ],
)
def test_bad_config_files(tmp_path, synthetic_root, checkpoint, files, message, capsys) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = ["test", tmp_path / "top.yaml", checkpoint, "--out", tmp_path / "out" / "r.json"]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root, checkpoint])
    assert err.startswith("error: config file ") and message in err, err


def test_interpolation_in_an_override(tmp_path, synthetic_root, checkpoint, capsys) -> None:
    argv = ["test", FASTER, checkpoint, "--out", tmp_path / "r.json",
            *model_options(synthetic_root), "train.lr=${train.momentum}"]  # fmt: skip
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root, checkpoint])
    assert err == (
        "error: override train.lr: interpolations (${...}) are not supported; write the value "
        "itself, got '${train.momentum}'"
    )


# ------------------------------------------------------------ messages name the file (16)
def test_infer_names_the_checkpoint_that_does_not_fit(
    tmp_path, synthetic_root, checkpoint, capsys
) -> None:
    image = synthetic_root / "val" / "000000.png"
    argv = ["infer", DECOUPLED, checkpoint, image, "--out", tmp_path / "out",
            *model_options(synthetic_root)]  # fmt: skip
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root, checkpoint])
    assert err.startswith(f"error: checkpoint {checkpoint}: does not fit the model")


def test_sensitivity_names_the_checkpoint_of_a_bad_stored_config(
    tmp_path, synthetic_root, capsys
) -> None:
    stored = to_dict(load_config(FASTER, tiny_overrides(synthetic_root)))
    stored["train"]["no_such_key"] = 1
    bad = save_random_model(tmp_path / "bad.pth", synthetic_root, config=stored)
    argv = ["sensitivity", f"bad={bad}", "--out", tmp_path / "out", "--max-images", "1"]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert err.startswith(
        f"error: checkpoint {bad}: stored config: unknown key 'train.no_such_key'"
    )


def test_a_checkpoint_with_code_is_refused_without_torchs_advice(
    tmp_path, synthetic_root, capsys
) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"format": "drcnn-checkpoint", "model": argparse.Namespace(x=1)}, bad)
    argv = ["test", FASTER, bad, "--out", tmp_path / "r.json", *model_options(synthetic_root)]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert err.startswith(f"error: checkpoint {bad}: not a drcnn checkpoint")
    assert "argparse.Namespace" in err and "weights_only" not in err


def _zip_without_torch_data(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "a zip file, not a torch file")


# name -> writes a file that is not a drcnn checkpoint at the given path
JUNK_CHECKPOINTS: dict[str, Callable[[Path], object]] = {
    "text": lambda path: path.write_bytes(b"hello"),  # torch's unpickler raised KeyError 101
    "empty": lambda path: path.write_bytes(b""),
    "zip_not_torch": _zip_without_torch_data,
    "pickled_list": lambda path: path.write_bytes(pickle.dumps([1, 2, 3])),
    "torch_list": lambda path: torch.save([1, 2, 3], path),
    "model_not_a_dict": lambda path: torch.save({"format": "drcnn-checkpoint", "model": [1]}, path),
    "model_of_strings": lambda path: torch.save(
        {"format": "drcnn-checkpoint", "model": {"backbone.body.conv1.weight": "text"}}, path
    ),
}


@pytest.mark.parametrize("name", JUNK_CHECKPOINTS)
def test_a_junk_checkpoint_is_one_line(tmp_path, synthetic_root, capsys, recwarn, name) -> None:
    bad = tmp_path / "bad.pth"
    JUNK_CHECKPOINTS[name](bad)
    argv = ["test", FASTER, bad, "--out", tmp_path / "r.json", *model_options(synthetic_root)]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert err.startswith(f"error: checkpoint {bad}: not a drcnn checkpoint ("), err
    assert "weights_only" not in err
    assert not [str(w.message) for w in recwarn if "pickle" in str(w.message)]  # torch's notice


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("text", "(not a file that torch.save wrote: KeyError)"),
        ("pickled_list", "(not loadable as tensors and plain values: Unsupported operand 149)"),
    ],
)
def test_convert_refuses_a_junk_file_in_one_plain_line(
    tmp_path, capsys, recwarn, name, reason
) -> None:
    """``convert mmdet`` reads foreign files as ``load_checkpoint`` does (it printed torch's
    "(101)" or its weights_only advice, with terminal colour codes)."""
    bad = tmp_path / "bad.pth"
    JUNK_CHECKPOINTS[name](bad)
    argv = ["convert", "mmdet", bad, "--config", FASTER, "--out", tmp_path / "out.pth"]
    err = expect_refusal(argv, capsys, watch=[tmp_path])
    assert err.startswith(f"error: {bad}: not loadable with torch.load(weights_only=True)"), err
    assert err.endswith(reason), err
    assert not [str(w.message) for w in recwarn if "pickle" in str(w.message)]


def test_convert_refuses_code_without_torchs_advice(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "meta": argparse.Namespace(x=1)}, bad)
    argv = ["convert", "mmdet", bad, "--config", FASTER, "--out", tmp_path / "out.pth"]
    err = expect_refusal(argv, capsys, watch=[tmp_path])
    assert "argparse.Namespace" in err and "\x1b" not in err and "trust" not in err, err


# --------------------------------------------------- unwritable output, full disk (item 15)
BLOCKED_COMMANDS = ("data synth", "eval", "train", "test", "infer", "benchmark", "sensitivity",
                    "run")  # fmt: skip


@pytest.mark.parametrize("command", BLOCKED_COMMANDS)
def test_an_output_folder_that_cannot_be_made(
    command, tmp_path, synthetic_root, checkpoint, perturbed_results, capsys
) -> None:
    """The output path lies under a regular file (this fails even for root, unlike a 0o555
    folder): one line naming the folder, no traceback."""
    (tmp_path / "file").write_text("a file, not a folder")
    blocked = tmp_path / "file" / "sub"
    ann = synthetic_root / "annotations" / "instances_val.json"
    image = synthetic_root / "val" / "000000.png"
    options = model_options(synthetic_root)
    argv = {
        "data synth": ["data", "synth", "--out", blocked, "--num-train", "1", "--num-val", "1",
                       "--size", "64", "--workers", "1"],
        "eval": ["eval", "--ann", ann, "--results", perturbed_results, "--out", blocked / "m.json"],
        "train": ["train", FASTER, "--work-dir", blocked, *options, "train.max_iters=1"],
        "test": ["test", FASTER, checkpoint, "--out", blocked / "r.json", *options],
        "infer": ["infer", FASTER, checkpoint, image, "--out", blocked, *options],
        "benchmark": ["benchmark", FASTER, "--images", "1", "--warmup", "0", "--size", "64", "64",
                      "--device", "cpu", "--out", blocked / "b.json"],
        "sensitivity": ["sensitivity", f"m={checkpoint}", "--out", blocked, "--max-images", "1"],
        "run": ["run", write_spec(tmp_path / "spec.yaml", synthetic_root), "--out", blocked],
    }[command]  # fmt: skip
    watch = [tmp_path, synthetic_root, checkpoint, perturbed_results]
    err = expect_refusal(argv, capsys, watch)
    assert err.startswith(f"error: {blocked}") and os.strerror(errno.ENOTDIR) in err


def test_report_into_a_path_taken_by_a_folder(tmp_path, capsys) -> None:
    (tmp_path / "report.md").mkdir()
    err = expect_refusal(["report", tmp_path], capsys, watch=[tmp_path])
    assert err == f"error: {tmp_path / 'report.md'}: {os.strerror(errno.EISDIR)}"


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every atomic write fails as on a full disk (when its data is flushed)."""

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk(tmp_path, synthetic_root, perturbed_results, full_disk, capsys) -> None:
    nospace = os.strerror(errno.ENOSPC)
    exp = tmp_path / "exp"
    exp.mkdir()
    err = expect_refusal(["report", exp], capsys, watch=[tmp_path])
    assert err == f"error: {exp / 'report.md'}: {nospace}"

    ann = synthetic_root / "annotations" / "instances_val.json"
    out = tmp_path / "metrics.json"
    argv = ["eval", "--ann", ann, "--results", perturbed_results, "--out", out]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root, perturbed_results])
    assert err == f"error: {out}: {nospace}"

    spec = write_spec(tmp_path / "spec.yaml", synthetic_root)
    run_out = tmp_path / "run"
    argv = ["run", spec, "--out", run_out]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root], may_create=[run_out])
    assert err == f"error: {run_out / 'spec.yaml'}: {nospace}"
    assert [p.name for p in run_out.iterdir()] == [".lock"]  # no temp file left behind


def test_a_gpu_index_the_machine_lacks_is_a_one_line_error(monkeypatch) -> None:
    """``cuda:N`` past the machine's GPUs, or a torchrun rank past them (more processes per node
    than GPUs), is refused naming the device and the count, before torch.cuda.set_device fails
    with "invalid device ordinal"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DrcnnError, match=r"^--device cuda:2: this process sees 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DrcnnError, match=r"^--device cuda with LOCAL_RANK=2 \(torchrun"):
        resolve_device("cuda")
    assert chosen == [1]


def test_device_auto_is_the_cpu_on_a_machine_without_cuda(monkeypatch) -> None:
    """``--device auto`` (and no --device) on a CPU-only machine: the CPU, exactly as before;
    with CUDA available, cuda (its device index from LOCAL_RANK under torchrun)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert device_name("auto") == "cpu" and device_name("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_name("auto") == device_name(None) == "cuda"
