"""The scoring stage of :func:`~knnad.distributed.predict_dataset`, run in a pool of Ray actors:
each loads the saved model once, then turns batches of decoded images into rows of the output
(and anomaly map files)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..detector import Detector
from ..preprocessing import Preprocessor, upright_size
from .failures import carried

#: The model's settings that Detector.load takes (the others go to set_params).
LOAD_PARAMS = ("weights", "backend", "device")
#: Folder of the anomaly maps (``maps=True``) inside the output; the leading underscore makes
#: pyarrow, pandas and Ray skip it when they read the output as a Parquet dataset.
MAPS_FOLDER = "_maps"


def schema(maps: bool):
    """The pyarrow schema of the output's rows (``map_file`` with ``maps``)."""
    import pyarrow as pa

    fields = [("path", pa.string()), ("image_score", pa.float32()), ("label", pa.bool_()),
              ("map_max", pa.float32()), ("status", pa.string()), ("error", pa.string())]
    return pa.schema(fields + ([("map_file", pa.string())] if maps else []))


def map_name(path: str) -> str:
    """The anomaly map file of image ``path``: unique per path, and the same in a retried task
    (which then overwrites the map of its failed try)."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{MAPS_FOLDER}/{Path(path).stem[:80]}-{digest}.npy"


class _Scorer:
    """The callable class of predict_dataset's actor pool: loads the model once, then scores
    the decoded images of each batch (rows that could not be decoded become skipped rows).
    An exception of a batch leaves the actor :func:`~knnad.distributed.failures.carried`, so
    that the driver names it."""

    def __init__(self, model: str, params: Dict[str, Any], batch_size: int,
                 staging: Optional[str], preprocessor: Preprocessor):
        load = {name: params[name] for name in LOAD_PARAMS if name in params}
        self.detector = Detector.load(model, **load)
        predict = {name: value for name, value in params.items() if name not in load}
        # The decoded arrays no longer know their images' sizes: the detector gives maps at the
        # model's frame, and map_size="original" (params only) resizes each to its file's size.
        self.original = predict.pop("map_size", "processed") == "original"
        self.detector.set_params(**predict, batch_size=batch_size, progress=False,
                                 map_size="processed")
        if vars(self.detector.preprocessor_) != vars(preprocessor):
            raise RuntimeError(f"the images were decoded with {preprocessor!r}, but {model} "
                               f"prepares them with {self.detector.preprocessor_!r}; report this "
                               f"knnad bug")
        self.staging = staging

    def _save_map(self, staging: str, path: str, anomaly_map: np.ndarray) -> str:
        name = map_name(path)
        target = os.path.join(staging, name)
        partial = f"{target}.{os.getpid()}.partial"
        with open(partial, "wb") as handle:
            np.save(handle, anomaly_map)
        os.replace(partial, target)
        return name

    def __call__(self, batch: Dict[str, np.ndarray]):
        try:
            return self._rows(batch)
        except Exception as error:
            raise carried(error) from error

    def _rows(self, batch: Dict[str, np.ndarray]):
        """The output's rows of ``batch``, a pyarrow Table: its decoded images scored, the others
        skipped with their errors."""
        import pyarrow as pa

        paths = [str(path) for path in batch["path"]]
        decoded = [row for row, error in enumerate(batch["error"]) if not error]
        columns: Dict[str, list] = {name: [] for name in schema(self.staging is not None).names}
        # Indexing copies the images: Ray's arrays are read-only, torch wants writable ones.
        predictions = self.detector.predict_batches(batch["image"][decoded]) if decoded else []
        rows = iter(decoded)
        for prediction in predictions:
            labels = [None] * len(prediction) if prediction.labels is None else prediction.labels
            for score, anomaly_map, label in zip(prediction.image_scores, prediction.anomaly_maps,
                                                 labels):
                path = paths[next(rows)]
                if self.original:
                    width, height = upright_size(path)
                    anomaly_map = self.detector.preprocessor_.original_maps(
                        anomaly_map[None], [(height, width)])[0]
                columns["path"].append(path)
                columns["image_score"].append(float(score))
                columns["label"].append(None if label is None else bool(label))
                columns["map_max"].append(float(anomaly_map.max()))
                columns["status"].append("scored")
                columns["error"].append(None)
                if self.staging is not None:
                    columns["map_file"].append(self._save_map(self.staging, path, anomaly_map))
        for row, error in enumerate(batch["error"]):
            if error:
                for name, values in columns.items():
                    values.append(paths[row] if name == "path" else "skipped" if name == "status"
                                  else str(error) if name == "error" else None)
        return pa.Table.from_pydict(columns, schema=schema(self.staging is not None))
