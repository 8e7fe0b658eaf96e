"""COCO error analysis (drcnn.analysis.error_analysis) on hand-built ground truth and detections
whose breakdown is known by construction, cross-checked against pycocotools' own AP.

The hand-built case (:func:`_case`): one 200 x 200 image, 20 x 20 objects at least 20 px apart
(no detection overlaps an object it is not placed on). Classes 1-3 share supercategory ``X``,
4-6 share ``Y``; each class has one object (class 6: two).

- ``perfect`` (1): one exact detection. Every setting: AP 100.
- ``loose`` (2): one detection of IoU 0.3 with its object (20 x 6 inside the 20 x 20 box:
  120 / 400). A false positive at IoU .75 and .5 (C75 = C50 = 0, the object missed: precision 0
  at every recall), found from ``Loc`` (IoU .1) on: 100.
- ``similar`` (3): an exact detection (score .5) and a higher-scoring one (.9) on the object of
  class 1, same supercategory. Ranked: FP, TP: precision 1/2 at recall 1, interpolated 1/2 at
  every recall threshold: AP 50 until ``Sim`` ignores the confusion: 100.
- ``other`` (4): the same with the FP on class 1's object, another supercategory: 50 until
  ``Oth``: 100.
- ``background`` (5): the same with the FP on empty background: 50 until ``BG``: 100.
- ``missed`` (6): two objects, one detected exactly. Recall 1/2 at precision 1: precision 1 at
  the 51 recall thresholds 0, .01, ..., .5 of 101, 0 above: AP 100 * 51 / 101 in every
  setting up to ``BG`` (a step to the highest recall reached), 100 at ``FN``.

Every detection but ``loose``'s is exact, so AP (IoU .50:.95), AP50 and AP75 per class are the
``C50`` values. ``all`` is the mean over the six classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from drcnn.analysis import error_analysis, plots
from drcnn.analysis.error_analysis import PER_CLASS_COLUMNS, SETTINGS
from drcnn.engine.coco_eval import evaluate_coco
from drcnn.errors import DrcnnError

HALF = 100 * 51 / 101  # AP of recall 1/2 at precision 1 (see the module docstring)
EXPECTED = {  # class -> C75, C50, Loc, Sim, Oth, BG, FN
    "perfect": [100, 100, 100, 100, 100, 100, 100],
    "loose": [0, 0, 100, 100, 100, 100, 100],
    "similar": [50, 50, 50, 100, 100, 100, 100],
    "other": [50, 50, 50, 50, 100, 100, 100],
    "background": [50, 50, 50, 50, 50, 100, 100],
    "missed": [HALF, HALF, HALF, HALF, HALF, HALF, 100],
}
CLASSES = list(EXPECTED)
SUPERCATEGORY = {"perfect": "X", "loose": "X", "similar": "X"}  # the others: "Y"


def _box(column: int, row: int) -> list[float]:
    """A 20 x 20 box (x, y, w, h) in grid cell ``(column, row)`` (cells 40 px apart)."""
    return [10.0 + 40 * column, 10.0 + 40 * row, 20.0, 20.0]


def _case(tmp_path: Path, second_image: bool = False) -> tuple[Path, Path]:
    """The annotation and result files of the module docstring's case. ``second_image``: the
    undetected object of ``missed`` lies in an image 2 instead of image 1."""
    cats = [
        {"id": k + 1, "name": name, "supercategory": SUPERCATEGORY.get(name, "Y")}
        for k, name in enumerate(CLASSES)
    ]
    cat = {name: k + 1 for k, name in enumerate(CLASSES)}
    objects = [  # (image, class, box)
        (1, "perfect", _box(0, 0)),
        (1, "loose", _box(1, 0)),
        (1, "similar", _box(2, 0)),
        (1, "other", _box(3, 0)),
        (1, "background", _box(0, 2)),
        (1, "missed", _box(1, 2)),
        (2 if second_image else 1, "missed", _box(2, 2)),
    ]
    annotations = [
        {
            "id": i + 1,
            "image_id": image,
            "category_id": cat[name],
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": 0,
        }
        for i, (image, name, box) in enumerate(objects)
    ]
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2)]
    detections = [  # (class, box, score)
        ("perfect", _box(0, 0), 0.9),
        ("loose", [50.0, 10.0, 20.0, 6.0], 0.9),  # IoU 120 / 400 = 0.3 with _box(1, 0)
        ("similar", _box(2, 0), 0.5),
        ("similar", _box(0, 0), 0.9),  # on the object of "perfect" (supercategory X)
        ("other", _box(3, 0), 0.5),
        ("other", _box(0, 0), 0.9),  # on the object of "perfect" (another supercategory)
        ("background", _box(0, 2), 0.5),
        ("background", _box(3, 3), 0.9),  # on empty background
        ("missed", _box(1, 2), 0.9),
    ]
    results = [
        {"image_id": 1, "category_id": cat[name], "bbox": box, "score": score}
        for name, box, score in detections
    ]
    ann_file, results_file = tmp_path / "ann.json", tmp_path / "results.json"
    ann_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats})
    )
    results_file.write_text(json.dumps(results))
    return ann_file, results_file


def _expected(columns: list[str], pick: slice | list[int]) -> pd.DataFrame:
    """The hand-derived table: the chosen settings of EXPECTED per class, then their mean."""
    rows = {name: np.array(values, dtype=float)[pick] for name, values in EXPECTED.items()}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    table.loc["all"] = table.mean()
    return table.rename_axis("class").reset_index()


def test_breakdown_of_the_hand_built_case(tmp_path: Path):
    ann_file, results_file = _case(tmp_path)
    table = error_analysis.error_breakdown(ann_file, results_file)
    assert table.columns.tolist() == ["class", *SETTINGS]
    pd.testing.assert_frame_equal(table, _expected(SETTINGS, slice(None)), atol=1e-9)


def test_c75_c50_and_per_class_ap_agree_with_pycocotools(tmp_path: Path):
    ann_file, results_file = _case(tmp_path)
    reference = evaluate_coco(ann_file, results_file)  # COCOeval.summarize's numbers
    overall = error_analysis.error_breakdown(ann_file, results_file).set_index("class").loc["all"]
    assert overall["C75"] == pytest.approx(100 * reference["AP75"])
    assert overall["C50"] == pytest.approx(100 * reference["AP50"])
    per_class = error_analysis.per_class_ap(ann_file, results_file)
    assert per_class.columns.tolist() == ["class", *PER_CLASS_COLUMNS]
    pd.testing.assert_frame_equal(per_class, _expected(PER_CLASS_COLUMNS, [1, 1, 1]), atol=1e-9)
    overall = per_class.set_index("class").loc["all"]
    assert overall.tolist() == pytest.approx([100 * reference[k] for k in ("AP", "AP50", "AP75")])


def test_realistic_results_agree_with_pycocotools(synthetic_root: Path, perturbed_results: Path):
    """Jittered, relabelled, missed and spurious boxes on the synthetic val split: C75 / C50
    and the per-class AP over classes are COCOeval's summary numbers, and the settings never
    lose AP (each forgives more errors). The shapes share one supercategory: Sim == Oth."""
    ann_file = synthetic_root / "annotations" / "instances_val.json"
    reference = evaluate_coco(ann_file, perturbed_results)
    table = error_analysis.error_breakdown(ann_file, perturbed_results)
    overall = table.set_index("class").loc["all"]
    assert overall["C75"] == pytest.approx(100 * reference["AP75"])
    assert overall["C50"] == pytest.approx(100 * reference["AP50"])
    values = table[SETTINGS].dropna().to_numpy()
    assert (np.diff(values, axis=1) >= -1e-9).all()
    np.testing.assert_allclose(table["Sim"], table["Oth"])
    assert (table["FN"].dropna() == 100).all() and overall["BG"] < 100  # some objects missed
    per_class = error_analysis.per_class_ap(ann_file, perturbed_results).set_index("class")
    assert per_class.loc["all", "AP"] == pytest.approx(100 * reference["AP"])


@pytest.mark.parametrize(
    ("supercategory", "changed", "equal_to"),
    [
        (None, "similar", "Loc"),  # no supercategory: no similar class, Sim is Loc
        ("shapes", "other", "Oth"),  # one for all: every other class is similar, Sim is Oth
    ],
)
def test_supercategory_grouping(tmp_path: Path, supercategory, changed, equal_to):
    ann_file, results_file = _case(tmp_path)
    data = json.loads(ann_file.read_text())
    for cat in data["categories"]:
        if supercategory is None:
            del cat["supercategory"]
        else:
            cat["supercategory"] = supercategory
    ann_file.write_text(json.dumps(data))
    table = error_analysis.error_breakdown(ann_file, results_file).set_index("class")
    np.testing.assert_allclose(table["Sim"], table[equal_to])
    assert table.loc[changed, "Sim"] != EXPECTED[changed][SETTINGS.index("Sim")]


def test_duplicate_on_an_object_of_a_similar_class_stays_a_false_positive(tmp_path: Path):
    """An ignored object takes one detection (as in the COCO API's analysis; a crowd region
    would absorb both): ``similar`` ranked FP-ignored (.9), FP (.8), TP (.5) at Sim has
    precision 1/2 at recall 1: Sim = 50 (not 100)."""
    ann_file, results_file = _case(tmp_path)
    results = json.loads(results_file.read_text())
    results.append({"image_id": 1, "category_id": 3, "bbox": _box(0, 0), "score": 0.8})
    results_file.write_text(json.dumps(results))
    table = error_analysis.error_breakdown(ann_file, results_file).set_index("class")
    assert table.loc["similar", ["C50", "Sim", "Oth"]].tolist() == pytest.approx([100 / 3, 50, 50])


def test_image_ids_restrict_the_evaluation(tmp_path: Path):
    """With the undetected ``missed`` object in image 2, evaluating image 1 only finds every
    object of ``missed``: 100 in every setting; both images: the hand-derived values."""
    ann_file, results_file = _case(tmp_path, second_image=True)
    both = error_analysis.error_breakdown(ann_file, results_file).set_index("class")
    assert both.loc["missed"].tolist() == pytest.approx(EXPECTED["missed"])
    first = error_analysis.error_breakdown(ann_file, results_file, image_ids=[1])
    assert first.set_index("class").loc["missed"].tolist() == pytest.approx([100] * 7)


def test_no_detections_and_classes_without_objects(tmp_path: Path):
    """Nothing detected: 0 in every setting but FN (100), AP 0. A class without objects in the
    evaluated images has no values and stays out of ``all``."""
    ann_file, results_file = _case(tmp_path, second_image=True)
    results_file.write_text("[]")
    table = error_analysis.error_breakdown(ann_file, results_file, image_ids=[1])
    assert (table[SETTINGS[:-1]] == 0).all().all() and (table["FN"] == 100).all()
    assert (error_analysis.per_class_ap(ann_file, results_file)[PER_CLASS_COLUMNS] == 0).all().all()
    ann_file, results_file = _case(tmp_path)  # the hand-built case, plus a class "absent"
    data = json.loads(ann_file.read_text())
    data["categories"].append({"id": 7, "name": "absent", "supercategory": "Y"})
    ann_file.write_text(json.dumps(data))
    table = error_analysis.error_breakdown(ann_file, results_file).set_index("class")
    assert table.loc["absent"].isna().all()
    assert table.loc["all"].tolist() == pytest.approx(_expected(SETTINGS, slice(None)).iloc[-1, 1:])


def test_bad_results_are_refused(tmp_path: Path):
    ann_file, results_file = _case(tmp_path)
    results_file.write_text(
        json.dumps([{"image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1], "score": 1}])
    )
    with pytest.raises(DrcnnError, match="unknown category_id 99"):
        error_analysis.error_breakdown(ann_file, results_file)


def _run(exp: Path, name: str, results: list[dict], ann_file: Path) -> None:
    """A tested model work dir: metrics.json, results.bbox.json, config.yaml (data paths)."""
    work = exp / "models" / name
    work.mkdir(parents=True)
    (work / "metrics.json").write_text("{}")
    (work / "results.bbox.json").write_text(json.dumps(results))
    data = {"root": str(ann_file.parent), "val_ann": ann_file.name, "max_val_images": None}
    (work / "config.yaml").write_text(yaml.safe_dump({"data": data}))


def test_experiment_errors_average_seed_runs_and_feed_the_plot(tmp_path: Path):
    """Runs b, a-seed0 (the hand-built detections) and a-seed1 (every object found exactly:
    100 everywhere) in the spec's order b, a: a is the mean of the two, b the hand values."""
    ann_file, results_file = _case(tmp_path)
    hand = json.loads(results_file.read_text())
    annotations = json.loads(ann_file.read_text())["annotations"]
    exact = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in annotations
    ]
    exp = tmp_path / "exp"
    _run(exp, "a-seed0", hand, ann_file)
    _run(exp, "a-seed1", exact, ann_file)
    _run(exp, "b", hand, ann_file)
    (exp / "spec.yaml").write_text(yaml.safe_dump({"models": [{"name": "b"}, {"name": "a"}]}))
    errors = error_analysis.experiment_errors(exp)
    breakdown = errors.breakdown
    assert breakdown.columns.tolist() == ["model", "runs", "class", *SETTINGS]
    assert breakdown["model"].unique().tolist() == ["b", "a"]
    assert breakdown.groupby("model")["runs"].first().to_dict() == {"a": 2, "b": 1}
    hand_table = _expected(SETTINGS, slice(None))
    b = breakdown[breakdown["model"] == "b"].reset_index(drop=True)
    pd.testing.assert_frame_equal(b[["class", *SETTINGS]], hand_table, atol=1e-9)
    a = breakdown[breakdown["model"] == "a"].reset_index(drop=True)
    np.testing.assert_allclose(a[SETTINGS], (hand_table[SETTINGS] + 100) / 2)
    per_class = errors.per_class
    assert per_class.columns.tolist() == ["model", "runs", "class", *PER_CLASS_COLUMNS]
    a_ap = per_class[per_class["model"] == "a"].set_index("class")["AP"]
    np.testing.assert_allclose(a_ap, (_expected(PER_CLASS_COLUMNS, [1, 1, 1])["AP"] + 100) / 2)
    figure = plots.error_breakdown(breakdown, tmp_path / "figure.png")
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 100


def test_run_errors_are_kept_until_the_detections_change(tmp_path: Path, monkeypatch):
    """A run's tables are written to errors.json when first computed (the test step of drcnn
    run does it) and read back while the detections and annotations are unchanged."""
    ann_file, results_file = _case(tmp_path)
    exp = tmp_path / "exp"
    _run(exp, "a", json.loads(results_file.read_text()), ann_file)
    work = exp / "models" / "a"
    breakdown, per_class = error_analysis.run_errors(work)
    assert (work / "errors.json").is_file()
    pd.testing.assert_frame_equal(breakdown, _expected(SETTINGS, slice(None)), atol=1e-9)
    computed = []
    real = error_analysis.error_breakdown
    monkeypatch.setattr(
        error_analysis, "error_breakdown", lambda *a: computed.append(1) or real(*a)
    )
    again, again_per_class = error_analysis.run_errors(work)
    assert computed == []  # read back, not recomputed
    pd.testing.assert_frame_equal(again, breakdown)
    pd.testing.assert_frame_equal(again_per_class, per_class)
    # new detections (every object found exactly): computed again, 100 everywhere
    annotations = json.loads(ann_file.read_text())["annotations"]
    exact = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in annotations
    ]
    (work / "results.bbox.json").write_text(json.dumps(exact))
    fresh, _ = error_analysis.run_errors(work)
    assert computed == [1]
    np.testing.assert_allclose(fresh[SETTINGS], 100.0)
    # a torn cache file is recomputed, not an error
    (work / "errors.json").write_text("{")
    pd.testing.assert_frame_equal(error_analysis.run_errors(work)[0], fresh)
    assert computed == [1, 1]


def test_experiment_errors_refuse_missing_inputs(tmp_path: Path):
    ann_file, results_file = _case(tmp_path)
    exp = tmp_path / "exp"
    _run(exp, "a", json.loads(results_file.read_text()), ann_file)
    (exp / "models" / "a" / "config.yaml").write_text("train: {}\n")
    with pytest.raises(DrcnnError, match=r"config.yaml: expected data.root and data.val_ann"):
        error_analysis.experiment_errors(exp)
    (exp / "models" / "a" / "results.bbox.json").unlink()
    with pytest.raises(DrcnnError, match=r"results.bbox.json: not found"):
        error_analysis.experiment_errors(exp)
    with pytest.raises(DrcnnError, match="no model with test metrics"):
        error_analysis.experiment_errors(tmp_path / "empty")


def test_plot_refuses_a_table_without_the_settings(tmp_path: Path):
    with pytest.raises(DrcnnError, match="expected columns model, class, C75"):
        plots.error_breakdown(pd.DataFrame({"model": ["a"], "AP": [1.0]}), tmp_path / "f.png")
