"""normlab: batch vs group vs layer normalization on one small CNN for CIFAR-10.

In a notebook::

    import normlab
    result = normlab.run(data_dir="data", epochs=20)   # bn, gn and ln, then report.md
    result["gn"].plot_misclassified()
    normlab.predict(result["gn"].model_path, ["my_cat.jpg"])

``train``, ``run``, ``sweep``, ``study``, ``merge``, ``evaluate``, ``predict`` and ``load`` are ``normlab.api``'s functions.
"""
from normlab import api
from normlab.api import evaluate, load, merge, predict, run, study, sweep, train
from normlab.config import Config
from normlab.device import Runtime
from normlab.errors import ConfigError, DataError, NormlabError, ReportError, TrainingError, UsageError
from normlab.models import Net, count_params
from normlab.norms import NORMS, make_norm
from normlab.result import Prediction, RunResult, TrainResult, plot_predictions, predictions_table
from normlab.version import __version__

__all__ = ["Config", "ConfigError", "DataError", "NORMS", "Net", "NormlabError", "Prediction", "ReportError", "RunResult", "Runtime",
           "TrainResult", "TrainingError", "UsageError", "count_params", "evaluate", "load", "make_norm", "merge",
           "plot_predictions", "predict", "predictions_table", "run", "study", "sweep", "train", "__version__"]
