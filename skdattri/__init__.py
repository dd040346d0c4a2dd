"""skdattri: data attribution as scikit-learn estimators.

Which training samples made a model behave the way it does? Every method is an
estimator: ``fit(X_train, y_train)`` caches the training side, ``transform(X_query,
y_query)`` returns an ``(n_query, n_train)`` score matrix where positive means "helps".
"""

from ._config import config_context, get_config, set_config
from .base import BaseAttributor
from .dvemb import DVEmb
from .influence import InfluenceFunction
from .logra import LoGra
from .random_projection import TorchRandomProjection
from .representer import RepresenterPoints
from .shapley import KNNShapley
from .tracin import TracIn
from .trak import TRAK

__version__ = "0.1.0.dev0"

__all__ = [
    "BaseAttributor",
    "DVEmb",
    "InfluenceFunction",
    "KNNShapley",
    "LoGra",
    "RepresenterPoints",
    "TRAK",
    "TorchRandomProjection",
    "TracIn",
    "__version__",
    "config_context",
    "get_config",
    "set_config",
]
