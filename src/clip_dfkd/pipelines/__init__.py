"""One folder per stage; each stage's nodes form a Kedro namespace named after the stage."""

from kedro.pipeline import Node, Pipeline


def namespaced(namespace: str, nodes: list[Node]) -> Pipeline:
    """``nodes`` as namespace ``namespace``: kedro-viz draws them as one collapsible group and
    ``kedro run --namespaces=<namespace>`` selects them, while datasets and parameters keep
    their catalog names (node names become ``<namespace>.<node>``)."""
    return Pipeline(nodes, namespace=namespace, prefix_datasets_with_namespace=False)
