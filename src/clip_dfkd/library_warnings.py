"""Library warnings that say nothing about this project, hidden from ``kedro run``'s output."""

import warnings

from pydantic.warnings import PydanticDeprecatedSince20, PydanticDeprecatedSince211


def ignore_library_warnings() -> None:
    """Hides the warnings that libraries raise about their own code during a run.

    Each filter names the warning's category, the library module it is attributed to and the
    start of its message, so the same warning from the project's code, or another warning
    from that module, still shows. None of them is about how this project uses a library;
    each goes away with an upgrade of the library that triggers it.
    """
    # (category, module, message)
    for category, module, message in (
        # OmegaConf 2.4 deprecates register_new_resolver(); Kedro's config loader and
        # kedro-mlflow's hook call it (the project's resolvers go through Kedro's
        # CONFIG_LOADER_ARGS). Five of these per `kedro run`.
        (UserWarning, r"kedro\.config\.omegaconf_config|kedro_mlflow\.", r"register_new_resolver\(\) is deprecated"),
        # kedro-mlflow's config models use pydantic v1's class-based Config (one per model).
        (PydanticDeprecatedSince20, r"kedro_mlflow\.config\.", r"Support for class-based `config` is deprecated"),
        # Kedro reads model_fields from a validated parameter instance, not from its class.
        (PydanticDeprecatedSince211, r"kedro\.validation\.", r"Accessing the 'model_fields' attribute on the instance"),
        # kedro-viz's CLI, loaded with every command as a plugin, subclasses click's BaseCommand.
        (DeprecationWarning, r"kedro_viz\.", r"'BaseCommand' is deprecated"),
        # SQLAlchemy's SADeprecationWarning: MLflow's sqlite store maps a relation with noload.
        (DeprecationWarning, r"mlflow\.store\.", r"The ``noload`` loader strategy is deprecated"),
        # pandas' Pandas4Warning: MLflow compares a model's columns to a range() when it saves
        # the registered student's input example.
        (DeprecationWarning, r"mlflow\.models\.utils", r"Operation with range is deprecated"),
        # NumPy 2 calls torch.Tensor.__array__ with copy=False, which torch does not accept;
        # NumPy then copies, as diffusers' scheduler (np.array of a tensor) means to.
        (DeprecationWarning, r"diffusers\.schedulers\.", r"__array__ implementation doesn't accept a copy keyword"),
        # MLflow's import hook (it patches libraries when they are imported) wraps loaders in
        # a class that has only the legacy load_module(); Python falls back to it and says so.
        (ImportWarning, r"importlib\._bootstrap", r"_ImportHookChainedLoader\.exec_module\(\) not found"),
        (DeprecationWarning, r"importlib\._bootstrap", r"the load_module\(\) method is deprecated"),
    ):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _import_kedro_pipeline_model() -> None:
    """Imports kedro-mlflow's KedroPipelineModel (its hook imports it) without MLflow's
    UserWarning "Add type hints to the `predict` method ..." about that class: kedro-mlflow's
    predict() has none, and the project's StudentPyfunc has them and an explicit signature.
    MLflow raises it inside its own ``catch_warnings()`` + ``simplefilter("once")``, which
    overrides any filter, so it is recorded here instead and every other warning of the
    import is shown as usual."""
    # Kedro's logging setup (it captures warnings) runs on this import; outside the block,
    # or leaving the block would undo it.
    import kedro.framework.project  # noqa: F401

    with warnings.catch_warnings(record=True) as caught:
        import kedro_mlflow.mlflow  # noqa: F401
    for warning in caught:
        if not (warning.category is UserWarning and "Add type hints to the `predict` method" in str(warning.message)):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def quiet_library_warnings() -> None:
    """Hides the libraries' own warnings listed above, and nothing else."""
    ignore_library_warnings()
    _import_kedro_pipeline_model()
