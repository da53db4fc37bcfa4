"""``python -m clip_dfkd`` runs the project like ``kedro run``: ``find_run_command`` returns the
project's run command (:mod:`clip_dfkd.cli`), so user errors, Ctrl-C and exit codes are the same."""

import sys
from pathlib import Path

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project


def main(*args, **kwargs):
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
