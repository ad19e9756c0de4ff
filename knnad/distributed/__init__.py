"""Past one machine, on a Ray cluster (optional extra ``knnad[ray]``).

* :func:`fit_many` (:mod:`knnad.distributed.fitting`): one Ray task per job (a name and its
  normal images), each fitting a :class:`~knnad.Detector` and saving it as ``NAME.npz``; a
  failing job records its error and the others go on.
* :func:`predict_dataset` (:mod:`knnad.distributed.predict`): a Ray Data pipeline scoring any
  number of image files with a saved model in a pool of actors
  (:mod:`knnad.distributed.scorer`) that each load the model once; one Parquet row per image,
  written complete-or-absent.
* :class:`ShardedIndex` (:mod:`knnad.distributed.sharded`): the memory bank split over Ray
  actors each holding a :class:`~knnad.index.FlatL2Index`, searched in parallel with an exact
  top-k merge; :func:`shard_detector` makes it a fitted detector's index.
* :func:`connect` (:mod:`knnad.distributed.connection`) reaches Ray; a worker's failure is told
  apart from Ray's types of exceptions (:mod:`knnad.distributed.failures`).

On the command line: ``knnad predict MODEL IMAGES --out DIR --ray [ADDRESS]`` and
``knnad fit-many``.

Ray is imported inside the functions that use it, so ``import knnad`` (and this package) works
without it; using them without Ray raises an ImportError naming the extra. ``address``: None
uses the Ray instance this process is connected to, or starts a local one; ``"auto"`` the
cluster started on this machine by ``ray start``; ``"host:port"`` a cluster's head (GCS port,
6379 by default); ``"ray://host:port"`` a Ray Client server. Image and model paths must be
readable where the workers run (a shared file system on a multi-node cluster); relative paths
are made absolute on the driver.

Names load on first use, as in the top package: a Ray worker that unpickles one of this
package's classes or functions imports only its module (a :class:`ShardedIndex`'s shard
actors: :mod:`knnad.index` and torch, not the detector's torchvision and scikit-learn), not
every module named here.
"""
from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:  # what __getattr__ loads on first use, for type checkers and IDEs
    from .connection import CONNECT_TIMEOUT_S, RAY_EXTRA, connect, import_ray
    from .failures import MAX_RETRIES
    from .fitting import fit_many
    from .predict import MANIFEST, predict_dataset
    from .scorer import MAPS_FOLDER
    from .sharded import ShardedIndex, shard_detector

#: Public names and the modules that define them.
_NAMES = {"CONNECT_TIMEOUT_S": "connection", "RAY_EXTRA": "connection", "connect": "connection",
          "import_ray": "connection", "MAX_RETRIES": "failures", "fit_many": "fitting",
          "MANIFEST": "predict", "predict_dataset": "predict", "MAPS_FOLDER": "scorer",
          "ShardedIndex": "sharded", "shard_detector": "sharded"}


__getattr__, __dir__ = lazy_names(__name__, globals(), _NAMES)

__all__ = ["CONNECT_TIMEOUT_S", "MANIFEST", "MAPS_FOLDER", "MAX_RETRIES", "RAY_EXTRA",
           "ShardedIndex", "connect", "fit_many", "import_ray", "predict_dataset",
           "shard_detector"]
