"""The WSGI entry point gunicorn.conf.py names: the app, or one clear log line and exit code 3.

`gunicorn 'service.api.app:create_app()'` works too; this module only turns a refused artifact
into a short message instead of a traceback, so that a supervisor sees why start-up failed.
"""

from __future__ import annotations

import logging
import sys

from seqmodels.artifacts import ArtifactError
from service.api.app import create_app
from service.models.versions import RepositoryError

try:
    application = create_app()
except (ArtifactError, RepositoryError) as exc:
    logging.getLogger("service").critical("refusing to start: %s", exc)
    sys.exit(3)
