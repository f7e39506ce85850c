"""Export a fitted model as a versioned artifact directory: the only contract with serving.

Three parts, one module each; this one keeps the names other code imports:

- :mod:`training.onnx_graph`: the shared ONNX graph builder (:class:`Graph`,
  :func:`build_graph`, head pruning of factor models). Each model kind owns its graph:
  :meth:`RecommenderBase.graph_scores` / :meth:`~RecommenderBase.factor_parts`, or
  :meth:`~RecommenderBase.export_parts` for a kind served by its own scorer.
- :mod:`training.artifact_writer`: the artifact files, manifest, sha256, signature, atomic
  directory (:func:`export_model`; the layout is documented there).
- :mod:`training.registration`: MLflow (:func:`export_run`, model versions and aliases).

Adding an exportable kind touches its model module (``exportable = True`` and its graph),
the kind registry ``training.models.MODELS`` and its tests, never this package.
"""

from __future__ import annotations

from training.artifact_writer import (
    FORMAT,
    ITEM_COLUMNS,
    ArtifactParts,
    ExportInputs,
    export_model,
    exportable_kinds,
    history_matrix,
)
from training.onnx_graph import (
    EXCLUDED,
    MAX_NEIGHBOURS,
    OPSET,
    PRUNE_K,
    PRUNE_MIN_ITEMS,
    ExportError,
    Graph,
    ScoringGraph,
    build_graph,
    choose_head,
    scoring_order,
)
from training.registration import (
    RunNotExportable,
    _inputs_from_data,
    export_run,
    register_version,
)

#: The kinds an artifact can be written for (``exportable`` on their model class).
EXPORTABLE = exportable_kinds()

__all__ = [
    "EXCLUDED",
    "EXPORTABLE",
    "FORMAT",
    "ITEM_COLUMNS",
    "MAX_NEIGHBOURS",
    "OPSET",
    "PRUNE_K",
    "PRUNE_MIN_ITEMS",
    "ArtifactParts",
    "ExportError",
    "ExportInputs",
    "Graph",
    "RunNotExportable",
    "ScoringGraph",
    "_inputs_from_data",
    "build_graph",
    "choose_head",
    "export_model",
    "export_run",
    "exportable_kinds",
    "history_matrix",
    "register_version",
    "scoring_order",
]
