"""COCO error analysis: AP per class, and how much AP each kind of error costs.

The breakdown follows the definition of the COCO API's ``CocoEval.analyze`` (Derek Hoiem-style
analysis of false positives; cocodataset/cocoapi, ``MatlabAPI/CocoEval.m``, and the "Analysis"
section of the COCO detection evaluation page), which Detectron's and mmdetection's
``coco_error_analysis`` tools port to Python. Per class, precision is taken at COCO's 101
recall thresholds (all object areas, at most 100 detections per image) under seven settings,
each forgiving one more kind of error than the one before:

- ``C75``: matched at IoU 0.75 (the area under it is COCO's AP75);
- ``C50``: matched at IoU 0.5 (AP50);
- ``Loc``: matched at IoU 0.1, so poorly localised boxes count as found (duplicates stay
  false positives). Every later setting matches at IoU 0.1 too;
- ``Sim``: a detection of class ``c`` on an object of another class of ``c``'s supercategory
  is neither a true nor a false positive (those objects become ignored regions of ``c``);
- ``Oth``: the same for objects of every other class;
- ``BG``: false positives on background are forgiven as well: precision is 1 up to the
  highest recall ``Oth`` reaches, 0 beyond;
- ``FN``: the missed objects too: precision 1 everywhere (AP 100).

So the AP of a setting minus that of the one before is the AP its errors cost, and the
remaining gap ``FN - BG`` is what missed objects cost. A category without a ``supercategory``
field is its own supercategory (then its ``Sim`` equals ``Loc``); when every category shares
one supercategory, as the synthetic dataset's shapes do, ``Sim`` equals ``Oth``.

The ignored regions are objects whose ``ignore`` flag is set but which keep their box IoU and
match one detection each, as in the COCO API's analysis (not crowd regions, whose IoU is taken
over the detection alone and which absorb any number of detections).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from drcnn.analysis.provenance import file_digest
from drcnn.analysis.seeds import model_of
from drcnn.analysis.tables import model_dirs
from drcnn.data.coco import load_coco
from drcnn.engine.coco_eval import IOU_THRESHOLDS, check_references, load_results
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write_json, read_json

# the settings in order, each with what it forgives on top of the one before (figure legends)
SETTING_LABELS = {
    "C75": "C75: AP at IoU .75",
    "C50": "C50: + IoU .5",
    "Loc": "Loc: + poor localisation (IoU .1)",
    "Sim": "Sim: + confusion within the supercategory",
    "Oth": "Oth: + confusion with any class",
    "BG": "BG: + false positives on background",
    "FN": "FN: + missed objects",
}
SETTINGS = list(SETTING_LABELS)
PER_CLASS_COLUMNS = ["AP", "AP50", "AP75"]
ALL = "all"  # the row of the mean over classes
LOOSE_IOU = 0.1  # the IoU of the Loc, Sim and Oth settings
RESULTS_FILE = "results.bbox.json"  # beside metrics.json in a model work dir
# beside it: the run's two tables and what they were computed from (see run_errors)
ERRORS_FILE = "errors.json"


class ErrorTables(NamedTuple):
    """An experiment's error analysis: one row per model and class (and ``all``)."""

    breakdown: pd.DataFrame  # model, runs, class, C75 ... FN
    per_class: pd.DataFrame  # model, runs, class, AP, AP50, AP75


def _restrict(evaluator: COCOeval, image_ids: Sequence[int] | None) -> COCOeval:
    """``evaluator`` limited to area ``all``, 100 detections per image and ``image_ids``."""
    params = evaluator.params
    if image_ids is not None:
        params.imgIds = sorted(int(i) for i in image_ids)
    params.maxDets = [100]
    params.areaRng = [params.areaRng[params.areaRngLbl.index("all")]]
    params.areaRngLbl = ["all"]
    return evaluator


def _precision(evaluator: COCOeval) -> np.ndarray:
    """Run ``evaluator`` silently; its precision ``(T, R, K)`` (-1 where a class has no object)."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"][:, :, :, 0, 0]


class _OneClassAnalysis(COCOeval):
    """COCOeval of the detections of one class against the objects of ``cat_ids`` with class
    labels ignored (``useCats = 0``): objects of ``cat_id`` count, those of the other classes
    of ``cat_ids`` become ignored regions (COCO's ``Sim`` and ``Oth`` settings)."""

    def __init__(self, coco: COCO, detections: COCO, cat_id: int, cat_ids: list[int]) -> None:
        super().__init__(coco, detections, iouType="bbox")
        self.cat_id = cat_id
        self.params.useCats = 0
        self.params.catIds = cat_ids
        self.params.iouThrs = np.array([LOOSE_IOU])

    def _prepare(self) -> None:
        """pycocotools' preparation (it sets ``ignore`` from ``iscrowd`` alone), then only this
        class's detections are kept and the other classes' objects get ``ignore`` (on copies:
        the annotation dicts belong to the shared ground-truth COCO object)."""
        super()._prepare()
        for key in [key for key in self._dts if key[1] != self.cat_id]:
            del self._dts[key]
        for key, objects in self._gts.items():
            if key[1] != self.cat_id:
                self._gts[key] = [{**obj, "ignore": 1} for obj in objects]


def _supercategory_members(coco: COCO, cat_id: int) -> list[int]:
    """The categories sharing ``cat_id``'s supercategory (only itself when it has none)."""
    group = coco.cats[cat_id].get("supercategory")
    if group is None:
        return [cat_id]
    return sorted(c for c, cat in coco.cats.items() if cat.get("supercategory") == group)


def _class_images(
    coco: COCO, detections: COCO, cat_id: int, image_ids: Sequence[int] | None
) -> list[int]:
    """The images with an object or a detection of ``cat_id`` (among ``image_ids``): the only
    ones where its one-class evaluations find a positive or a false positive."""
    found = set(coco.catToImgs[cat_id]) | set(detections.catToImgs[cat_id])
    return sorted(found if image_ids is None else found & set(image_ids))


def _class_curves(
    coco: COCO, detections: COCO, image_ids: Sequence[int] | None, standard: np.ndarray
) -> np.ndarray:
    """Precision ``(K, 7, R)`` of every class under the seven settings (module docstring);
    ``standard``: COCOeval's precision at IoU .75, .5, .1, ``(3, R, K)``, -1 for a class
    without objects (its Sim and Oth curves are left at 0)."""
    cat_ids = sorted(coco.cats)
    curves = np.zeros((len(cat_ids), len(SETTINGS), standard.shape[1]))
    curves[:, :3] = np.clip(standard, 0, None).transpose(2, 0, 1)
    for k, cat_id in enumerate(cat_ids):
        if (standard[0, :, k] == -1).all():
            continue
        images = _class_images(coco, detections, cat_id, image_ids)
        for column, members in ((3, _supercategory_members(coco, cat_id)), (4, cat_ids)):
            evaluator = _restrict(_OneClassAnalysis(coco, detections, cat_id, members), images)
            curves[k, column] = np.clip(_precision(evaluator)[0, :, 0], 0, None)
    curves[:, 5] = curves[:, 4] > 0
    curves[:, 6] = 1.0
    return curves


def _load(
    ann_file: str | Path | COCO, results_file: str | Path | list[dict]
) -> tuple[COCO, COCO | None]:
    """The ground truth and the checked detections (None when there are none)."""
    coco = load_coco(ann_file)
    source = str(results_file) if not isinstance(results_file, list) else "results"
    results = load_results(results_file)
    check_references(coco, results, source)
    if not results:
        return coco, None
    with contextlib.redirect_stdout(io.StringIO()):
        return coco, coco.loadRes(copy.deepcopy(results))  # loadRes edits its input


def _class_table(
    coco: COCO, values: np.ndarray, has_objects: np.ndarray, columns: list[str]
) -> pd.DataFrame:
    """Rows ``class`` (name) with ``columns`` in percent, then ``all`` (the mean over the
    classes with objects); NaN for a class without objects in the evaluated images."""
    names = [coco.cats[c]["name"] for c in sorted(coco.cats)]
    table = pd.DataFrame(100 * values, columns=columns)
    table.loc[~has_objects, columns] = math.nan
    table.insert(0, "class", names)
    mean = table.loc[has_objects, columns].mean()  # NaN when no class has objects
    return pd.concat([table, pd.DataFrame([{"class": ALL, **mean}])], ignore_index=True)


def error_breakdown(
    ann_file: str | Path | COCO,
    results_file: str | Path | list[dict],
    image_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The cumulative AP (percent) of each setting ``C75 C50 Loc Sim Oth BG FN`` (module
    docstring) per class and over classes (row ``all``): columns ``class``, :data:`SETTINGS`.

    ``image_ids`` restricts the evaluation (``data.max_val_images``). ``C75`` and ``C50`` equal
    COCOeval's AP75 and AP50; a class without objects in the images has NaN values and is left
    out of ``all``.
    """
    coco, detections = _load(ann_file, results_file)
    cat_ids = sorted(coco.cats)
    if detections is None:  # nothing detected: every setting but FN is 0
        curves = np.zeros((len(cat_ids), len(SETTINGS), 1))
        curves[:, 6] = 1.0
        has_objects = _has_objects(coco, image_ids)
    else:
        evaluator = _restrict(COCOeval(coco, detections, iouType="bbox"), image_ids)
        evaluator.params.iouThrs = np.array([0.75, 0.5, LOOSE_IOU])
        standard = _precision(evaluator)
        has_objects = (standard[0] > -1).any(axis=0)
        curves = _class_curves(coco, detections, image_ids, standard)
    return _class_table(coco, curves.mean(axis=2), has_objects, SETTINGS)


def _has_objects(coco: COCO, image_ids: Sequence[int] | None) -> np.ndarray:
    """Per class (sorted ids): whether it has a non-crowd object in the images."""
    images = set(coco.imgs if image_ids is None else image_ids)
    found = {
        a["category_id"]
        for a in coco.anns.values()
        if a["image_id"] in images and not a.get("iscrowd", 0)
    }
    return np.array([c in found for c in sorted(coco.cats)])


def per_class_ap(
    ann_file: str | Path | COCO,
    results_file: str | Path | list[dict],
    image_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """AP (IoU .50:.05:.95), AP50 and AP75 in percent per class and over classes (row
    ``all``, equal to COCOeval's summary AP, AP50, AP75) from COCOeval's precision array (area
    ``all``, 100 detections): columns ``class``, :data:`PER_CLASS_COLUMNS`."""
    coco, detections = _load(ann_file, results_file)
    if detections is None:
        values = np.zeros((len(coco.cats), len(PER_CLASS_COLUMNS)))
        return _class_table(coco, values, _has_objects(coco, image_ids), PER_CLASS_COLUMNS)
    evaluator = _restrict(COCOeval(coco, detections, iouType="bbox"), image_ids)
    evaluator.params.iouThrs = IOU_THRESHOLDS
    precision = _precision(evaluator)  # (10 IoU thresholds, R, K)
    has_objects = (precision[0] > -1).any(axis=0)
    at = {f"{t:.2f}": i for i, t in enumerate(IOU_THRESHOLDS)}
    values = np.stack(
        [
            precision.mean(axis=(0, 1)),
            precision[at["0.50"]].mean(axis=0),
            precision[at["0.75"]].mean(axis=0),
        ],
        axis=1,
    )
    return _class_table(coco, values, has_objects, PER_CLASS_COLUMNS)


def _val_source(work_dir: Path) -> tuple[Path, int | None]:
    """The val annotation file a model work dir was tested on (``data.root`` / ``data.val_ann``
    of its ``config.yaml``; relative paths from the working directory, as the data loader reads
    them) and ``data.max_val_images`` (None: all images)."""
    config_path = work_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        message = f"{config_path}: expected the run's config ({exc})".splitlines()[0]
        raise DrcnnError(message) from exc
    data = config.get("data") if isinstance(config, dict) else None
    if not (
        isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("root", "val_ann"))
    ):
        raise DrcnnError(f"{config_path}: expected data.root and data.val_ann (paths)")
    return Path(data["root"]) / data["val_ann"], data.get("max_val_images")


def val_split(work_dir: Path) -> tuple[COCO, list[int] | None]:
    """The val ground truth a model work dir was tested on (:func:`_val_source`) and the
    evaluated image ids: the first ``data.max_val_images`` (None: all)."""
    ann_file, limit = _val_source(work_dir)
    coco = load_coco(ann_file)
    return coco, None if limit is None else sorted(coco.imgs)[:limit]


def _frame(table: pd.DataFrame) -> dict:
    return {"columns": table.columns.tolist(), "data": table.to_numpy().tolist()}


def run_errors(work_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(breakdown, per-class AP)`` of one tested run, from ``results.bbox.json`` and its val
    split, kept in ``errors.json`` beside them with what they were computed from (the
    detections' and annotations' SHA-256 and ``max_val_images``). A later call reads that file
    while those are unchanged: the test step of ``drcnn run`` computes a run's tables as soon
    as it is tested, in parallel with the other steps, and the AP table step only reads them."""
    work_dir = Path(work_dir)
    results = work_dir / RESULTS_FILE
    if not results.is_file():
        raise DrcnnError(f"{results}: not found (the test step writes it beside metrics.json)")
    ann_file, limit = _val_source(work_dir)
    source = {
        "results_sha256": file_digest(results, 64),
        "annotations_sha256": file_digest(ann_file, 64) if ann_file.is_file() else None,
        "max_val_images": limit,
    }
    cache = work_dir / ERRORS_FILE
    if cache.is_file():
        with contextlib.suppress(DrcnnError, KeyError, TypeError, ValueError):
            kept = read_json(cache, "error tables")
            if kept["source"] == source:
                return pd.DataFrame(**kept["breakdown"]), pd.DataFrame(**kept["per_class"])
    coco, image_ids = val_split(work_dir)
    breakdown = error_breakdown(coco, results, image_ids)
    per_class = per_class_ap(coco, results, image_ids)
    tables = {"source": source, "breakdown": _frame(breakdown), "per_class": _frame(per_class)}
    atomic_write_json(cache, tables)
    return breakdown, per_class


def _runs(exp_dir: str | Path) -> Iterable[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """``(run name, breakdown, per-class AP)`` of every tested model run of the experiment."""
    for work_dir in model_dirs(exp_dir):
        yield work_dir.name, *run_errors(work_dir)


def _mean_over_seeds(tables: list[tuple[str, pd.DataFrame]], columns: list[str]) -> pd.DataFrame:
    """One row per model (its ``<model>-seed<k>`` runs averaged) and class, models in order of
    appearance: ``model, runs, class, <columns>``."""
    long = pd.concat([table.assign(run=run) for run, table in tables], ignore_index=True)
    long["model"] = long["run"].map(model_of)
    groups = long.groupby(["model", "class"], sort=False)
    out = groups[columns].mean().join(groups["run"].nunique().rename("runs")).reset_index()
    return out[["model", "runs", "class", *columns]]


def experiment_errors(exp_dir: str | Path) -> ErrorTables:
    """The error breakdown and the per-class AP of every tested model of an experiment
    directory (``models/<run>/results.bbox.json`` against the val split of the run's
    ``config.yaml``), the seed runs of a model averaged (``runs``: how many)."""
    runs = list(_runs(exp_dir))
    if not runs:
        raise DrcnnError(f"{Path(exp_dir) / 'models'}: no model with test metrics (metrics.json)")
    return ErrorTables(
        breakdown=_mean_over_seeds([(run, b) for run, b, _ in runs], SETTINGS),
        per_class=_mean_over_seeds([(run, p) for run, _, p in runs], PER_CLASS_COLUMNS),
    )
