"""One folder per stage; each stage's nodes form a Kedro namespace named after the stage."""

from kedro.pipeline import Node, Pipeline

# Node tags that say which nodes load the CLIP teacher's weights (preflight checks them only
# where a node will; kedro-viz filters by them): always, only for the inversion backend, only
# when the student's targets come from the teacher online.
RUNS_TEACHER = "teacher"
RUNS_TEACHER_FOR_INVERSION = "teacher.inversion"
RUNS_TEACHER_ONLINE = "teacher.online"


def namespaced(namespace: str, nodes: list[Node]) -> Pipeline:
    """``nodes`` as namespace ``namespace``: kedro-viz draws them as one collapsible group and
    ``kedro run --namespaces=<namespace>`` selects them, while datasets and parameters keep
    their catalog names (node names become ``<namespace>.<node>``)."""
    return Pipeline(nodes, namespace=namespace, prefix_datasets_with_namespace=False)
