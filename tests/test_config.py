"""Config schema, ``_base_`` inheritance, dotted overrides and their error messages."""

from pathlib import Path

import pytest

from drcnn.config import config_from_dict, load_config, rpn_nms_thresholds, to_dict, to_yaml
from drcnn.errors import DrcnnError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_have_the_keys_tooling_relies_on():
    cfg = load_config()
    assert cfg.data.root == "data/synthetic"
    assert cfg.train.max_iters is None
    assert cfg.model.backbone.pretrained is None


def test_base_inheritance_order_and_list_replacement(tmp_path):
    write(tmp_path / "_base_/a.yaml", "train:\n  lr: 0.1\n  lr_steps: [1, 2, 3]\n")
    write(tmp_path / "_base_/b.yaml", "train:\n  lr: 0.2\n  momentum: 0.5\n")
    child = write(
        tmp_path / "cfgs/child.yaml",
        "_base_: [../_base_/a.yaml, ../_base_/b.yaml]\ntrain:\n  lr_steps: [7]\n",
    )
    cfg = load_config(child)
    assert cfg.train.lr == 0.2  # later base wins
    assert cfg.train.momentum == 0.5
    assert list(cfg.train.lr_steps) == [7]  # lists are replaced, not concatenated


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        [
            "model.backbone.pretrained=null",
            "train.max_iters=20",
            "data.root=/path",
            "model.rpn.nms_thresh=[0.7,0.85]",
            "model.transform.min_size=[640,800]",
        ],
    )
    assert cfg.train.max_iters == 20
    assert cfg.data.root == "/path"
    assert rpn_nms_thresholds(cfg.model.rpn) == (0.7, 0.85)
    assert list(cfg.model.transform.min_size) == [640, 800]


def test_override_list_of_stages_and_partial_mapping():
    cfg = load_config(
        None,
        [
            "model.roi_head.stages=[{iou_thresh: 0.5}, {iou_thresh: 0.6, loss_weight: 0.5}]",
            "model.roi_head.test={nms: soft_nms_gaussian}",
        ],
    )
    assert [s.iou_thresh for s in cfg.model.roi_head.stages] == [0.5, 0.6]
    assert list(cfg.model.roi_head.stages[1].target_stds) == [0.1, 0.1, 0.2, 0.2]  # default
    assert cfg.model.roi_head.test.nms == "soft_nms_gaussian"
    assert cfg.model.roi_head.test.max_per_image == 100  # untouched field kept


def test_single_nms_threshold_is_one_set():
    assert rpn_nms_thresholds(load_config().model.rpn) == (0.7,)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  roi_head:\n    num_clases: 3\n")
    with pytest.raises(DrcnnError, match=r"bad\.yaml.*model\.roi_head\.num_clases"):
        load_config(bad)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train:\n  lr: fast\n")
    with pytest.raises(DrcnnError, match=r"bad\.yaml.*train\.lr"):
        load_config(bad)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("model.foo=1", "model.foo: unknown config key"),
        ("train.lr=abc", "train.lr"),
        ("train.max_iters", "expected KEY=VALUE"),
        ("model.rpn.nms_thresh=[0.7,0.8,0.9]", "model.rpn.nms_thresh"),
        ("model.rpn.nms_thresh=1.5", "model.rpn.nms_thresh"),
        ("model.roi_head.type=yolo", "model.roi_head.type"),
        ("model.backbone.arch=vgg16", "model.backbone.arch"),
        ("model.roi_head.stages=[]", "model.roi_head.stages"),
    ],
)
def test_bad_overrides_raise_one_line_errors(override, pattern):
    with pytest.raises(DrcnnError, match=pattern) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(DrcnnError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path / "broken.yaml", "train: [unclosed\n")
    with pytest.raises(DrcnnError, match=r"broken\.yaml.*not valid YAML"):
        load_config(bad)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: [b.yaml]\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(DrcnnError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_round_trip_through_plain_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["model.roi_head.type=cascade", "train.max_iters=5"])
    again = config_from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    saved = write(tmp_path / "resolved.yaml", to_yaml(cfg))
    assert to_dict(load_config(saved)) == to_dict(cfg)


def test_load_on_top_of_a_stored_config():
    stored = load_config(None, ["model.roi_head.num_classes=8"])
    cfg = load_config(None, ["train.max_iters=3"], base=stored)
    assert cfg.model.roi_head.num_classes == 8
    assert cfg.train.max_iters == 3


def test_number_ranges_accept_their_limits_and_null():
    cfg = load_config(
        None,
        ["data.flip_prob=0", "data.workers=0", "train.stall_timeout=0", "train.eval_interval=0",
         "train.grad_clip=null", "data.max_val_images=null", "train.max_iters=null",
         "model.transform.min_size=[1, 800]"],
    )  # fmt: skip
    assert cfg.train.grad_clip is None and cfg.data.max_val_images is None
    cfg = load_config(None, ["data.flip_prob=1", "train.grad_clip=0.01", "train.max_iters=1",
                             "data.max_val_images=1", "train.lr=1e-6"])  # fmt: skip
    assert cfg.train.grad_clip == 0.01 and cfg.data.max_val_images == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grad_clip=-1", "train.grad_clip: expected a number > 0 or null (no clipping)"),
        ("data.max_val_images=0", "expected an integer >= 1 or null (all images), got 0"),
        ("data.flip_prob=1.5", "data.flip_prob: expected a number in [0, 1], got 1.5"),
        ("train.lr=.nan", "train.lr: expected a number > 0, got nan"),
        ("model.transform.min_size=[800, 0]", "expected every entry to be an integer >= 1, got 0"),
    ],
)
def test_out_of_range_numbers_name_key_and_range(override, message):
    with pytest.raises(DrcnnError) as info:
        load_config(None, [override])
    assert message in str(info.value)
